"""The shared-memory TP collectives: same sums as gloo, chosen together, nothing left behind.

Each test spawns a gloo world whose ranks run this file as a script (`python THIS SPEC RANK`):
a rank joins with `init_distributed` (which sets up the shm communicator), runs the spec's
jobs and saves what it saw to `<out_dir>/rank<RANK>.pt`; the test compares the ranks' files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
TESTS_DIR = HERE.parent

# (shape, dtype, transposed): decode and prefill activations, the LM head's logits shard, odd
# sizes, an empty tensor and a non-contiguous one. 600x1000 float32 (2.4 MB) is over the default
# 2 MiB slot, so it takes two rounds.
REDUCE_CASES: list[tuple[tuple[int, ...], str, bool]] = [
    ((1, 576), "float32", False),
    ((8, 576), "float32", False),
    ((64, 576), "float32", False),
    ((3, 7), "float32", False),
    ((0, 576), "float32", False),
    ((13,), "float64", False),
    ((5, 9), "int64", False),
    ((40, 24), "float32", True),
    ((64, 24576), "float32", False),
    ((600, 1000), "float32", False),
]
GATHER_CASES: list[tuple[tuple[int, ...], int]] = [
    ((1, 576), -1),
    ((8, 24576), -1),
    ((4, 7), 0),
    ((600, 1000), -1),
    ((3, 5, 2), 1),
    ((0, 5), 0),
]
SMALL_SLOT_BYTES = 256  # a second communicator whose slots make most cases take many rounds


# ----------------------------------------------------------------------------- spawned ranks
def _case_tensor(rank: int, index: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * index + rank)
    if dtype == "int64":
        return torch.randint(-1000, 1000, shape, generator=gen)
    return torch.randn(shape, generator=gen, dtype=getattr(torch, dtype))


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _compare_collectives(ctx: Any, comm: Any) -> list[dict[str, Any]]:
    """Every case through `comm` and through gloo: the error, and a digest of shm's result."""
    import torch.distributed as dist

    rows: list[dict[str, Any]] = []
    for i, (shape, dtype, transposed) in enumerate(REDUCE_CASES):
        x = _case_tensor(ctx.tp_rank, i, shape, dtype)
        want = x.clone()
        dist.all_reduce(want, group=ctx.tp_group)
        got = x.clone().t() if transposed else x.clone()
        comm.all_reduce(got)
        got = got.t() if transposed else got
        rows.append({
            "op": "all_reduce", "case": i, "shape": list(got.shape),
            "max_abs_err": float((got.double() - want.double()).abs().max()) if got.numel() else 0.0,
            "max_abs": float(want.double().abs().max()) if want.numel() else 0.0,
            "bitwise": torch.equal(got, want), "digest": _digest(got),
        })  # fmt: skip
    for i, (shape, dim) in enumerate(GATHER_CASES):
        x = _case_tensor(ctx.tp_rank, 100 + i, shape, "float32")
        parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
        dist.all_gather(parts, x, group=ctx.tp_group)
        want = torch.cat(parts, dim=dim)
        got = comm.all_gather(x, dim=dim)
        rows.append({
            "op": "all_gather", "case": i, "shape": list(got.shape),
            "bitwise": torch.equal(got, want) and got.shape == want.shape, "digest": _digest(got),
        })  # fmt: skip
    return rows


def _own_shm_names() -> list[str]:
    from support.leaks import our_shm_entries, owner_pid

    return [n for n in our_shm_entries() if owner_pid(n) == os.getpid()]


def _mapped_shm_names() -> list[str]:
    """Our shared-memory segments this process still has mapped (unlinked ones included)."""
    maps = pathlib.Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-2] if line.endswith("(deleted)") else line.split()[-1]
                   for line in maps if "/dev/shm/shardline_" in line})  # fmt: skip


OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object",
                      "scatter_object_list", "send_object_list", "recv_object_list",
                      "broadcast_object")  # fmt: skip


def _forbid_object_collectives() -> None:
    """Make torch.distributed's object collectives, and the pickling under them, raise here."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a torch.distributed object collective (pickle) was used")

    for name in OBJECT_COLLECTIVES:
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, refuse)
    c10d._object_to_tensor = refuse  # type: ignore[assignment]
    c10d._tensor_to_object = refuse  # type: ignore[assignment]


def _rank_main(spec_path: str, rank: int) -> None:
    from shardline.model.parallel import all_gather, all_reduce
    from shardline.model.parallel.shm_comm import setup_tp_comm
    from shardline.model.parallel_context import destroy_distributed, init_distributed

    spec = json.loads(pathlib.Path(spec_path).read_text())
    world = spec["world_size"]
    if spec.get("forbid_pickle"):
        _forbid_object_collectives()
    ctx = init_distributed(rank=rank, world_size=world, tp_size=world, pp_size=1,
                           init_method=spec["init_method"], backend="gloo", device="cpu",
                           timeout_s=60)  # fmt: skip
    result: dict[str, Any] = {
        "backend": ctx.tp_comm_backend,
        "has_comm": ctx.tp_comm is not None,
        "names_after_init": _own_shm_names(),
        "mapped_after_init": _mapped_shm_names(),
    }
    out = pathlib.Path(spec["out_dir"]) / f"rank{rank}.pt"
    try:
        for job in spec["jobs"]:
            if job == "collectives":  # through model.parallel, i.e. the ctx's chosen path
                comm = _CtxComm(ctx, all_reduce, all_gather)
                result["collectives"] = _compare_collectives(ctx, comm)
            elif job == "small_slots":
                small, backend = setup_tp_comm(ctx.tp_group, ctx.tp_rank, ctx.tp_size, ctx.device,
                                               timeout_s=60, slot_bytes=SMALL_SLOT_BYTES)  # fmt: skip
                assert small is not None and backend == "shm", backend
                result["small_slots"] = _compare_collectives(ctx, small)
                small.close()
            elif job == "model":
                result["logits"] = _run_tiny_model(ctx, spec["model_path"])
            elif job == "peer_dies":
                if rank == world - 1:
                    os._exit(0)  # gone without a word, as a SIGKILLed rank would be
                start = time.monotonic()
                try:
                    all_reduce(torch.ones(4), ctx)
                    result["peer_dies"] = "returned"
                except RuntimeError as exc:
                    result["peer_dies"] = str(exc)
                result["peer_dies_s"] = time.monotonic() - start
                torch.save(result, out)
                os._exit(0)  # the gloo group has a dead member; nothing more to tear down
    finally:
        comm_obj = ctx.tp_comm
        destroy_distributed()
        result["closed_after_destroy"] = comm_obj.closed if comm_obj is not None else None
        result["names_after_destroy"] = _own_shm_names()
        result["mapped_after_destroy"] = _mapped_shm_names()
        torch.save(result, out)


class _CtxComm:
    """model.parallel's collectives over a context, in the communicator's call shape."""

    def __init__(self, ctx: Any, reduce: Any, gather: Any) -> None:
        self.ctx, self.reduce, self.gather = ctx, reduce, gather

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.reduce(tensor, self.ctx)

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return self.gather(tensor, self.ctx, dim=dim)


def _run_tiny_model(ctx: Any, path: str) -> dict[str, torch.Tensor]:
    import importlib.util

    from shardline.model.config import ModelConfig
    from shardline.model.loader import load_model

    spec = importlib.util.spec_from_file_location(
        "shardline_test_dist_worker", HERE / "dist_worker.py"
    )
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    config = ModelConfig.from_path(path)
    return worker.run_scenario(load_model(config, ctx), config.hf_config.vocab_size)


# ----------------------------------------------------------------------------- the tests
def _spawn(
    tmp_path: pathlib.Path, world: int, jobs: list[str], modes: list[str | None], **extra: Any
) -> list[dict[str, Any]]:
    """Run `world` ranks of this file (rank r with SHARDLINE_TP_ALLREDUCE=modes[r], None: unset).

    Returns each rank's saved result (None for a rank that saved none).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = {"world_size": world, "jobs": jobs, "out_dir": str(tmp_path),
            "init_method": f"tcp://127.0.0.1:{port}", **extra}  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k != "SHARDLINE_TP_ALLREDUCE"}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p))  # fmt: skip
        if modes[rank] is not None:
            env["SHARDLINE_TP_ALLREDUCE"] = str(modes[rank])
        log = open(tmp_path / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, __file__, str(spec_path), str(rank)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    try:
        for proc, _ in procs:
            proc.wait(timeout=240)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} ---\n{(tmp_path / f'rank{r}.log').read_text()[-3000:]}"
                     for r in range(world))  # fmt: skip
    codes = [proc.returncode for proc, _ in procs]
    assert codes == [0] * world, f"exit codes {codes}\n{logs}"
    files = [tmp_path / f"rank{r}.pt" for r in range(world)]
    return [torch.load(f) if f.exists() else None for f in files]


def _assert_matches_gloo(rows_by_rank: list[list[dict[str, Any]]], world: int) -> None:
    for rows in rows_by_rank:
        assert len(rows) == len(REDUCE_CASES) + len(GATHER_CASES)
        for row in rows:
            if row["op"] == "all_gather" or world == 2 or REDUCE_CASES[row["case"]][1] == "int64":
                assert row["bitwise"], row  # a+b == b+a exactly; a gather is a copy
            else:  # gloo may add three ranks' values in another order
                assert row["max_abs_err"] <= 1e-6 * max(1.0, row["max_abs"]), row
    # Every rank holds the same bits.
    digests = [[row["digest"] for row in rows] for rows in rows_by_rank]
    assert all(d == digests[0] for d in digests), digests


@pytest.mark.parametrize("world", [2, 3])
def test_shm_collectives_match_gloo(tmp_path: pathlib.Path, world: int) -> None:
    results = _spawn(tmp_path, world, ["collectives", "small_slots"], ["shm"] * world)
    for r in results:
        assert r["backend"] == "shm" and r["has_comm"]
    _assert_matches_gloo([r["collectives"] for r in results], world)
    _assert_matches_gloo([r["small_slots"] for r in results], world)


@pytest.mark.parametrize(("world", "mode"), [(2, "auto"), (3, "shm"), (2, "gloo")])
def test_set_up_pickles_nothing(tmp_path: pathlib.Path, world: int, mode: str) -> None:
    """Every torch.distributed object collective (they pickle) raises in these ranks, yet the
    set-up (modes and hosts, rank 0's address, errors, auto's timed decision) goes through: it
    exchanges msgpack bytes as uint8 tensors. Auto on two ranks takes every exchange there is."""
    results = _spawn(tmp_path, world, ["small_slots"] if mode == "shm" else [], [mode] * world,
                     forbid_pickle=True)  # fmt: skip
    backends = {r["backend"] for r in results}
    assert len(backends) == 1, backends
    assert backends == {"shm"} if mode == "shm" else backends <= {"shm", "gloo"}
    if mode == "gloo":
        assert backends == {"gloo"}
    assert all(r["has_comm"] == (r["backend"] == "shm") for r in results)
    if mode == "shm":  # a second communicator, built after init, the same way
        _assert_matches_gloo([r["small_slots"] for r in results], world)


def test_set_up_messages_are_typed() -> None:
    """What a rank receives in the set-up is decoded into the expected shape or refused."""
    from shardline.model.parallel import shm_comm

    def enc(value: Any) -> bytes:
        return shm_comm._encode(value)

    assert shm_comm._decode(enc(["auto", "h"]), "x", shm_comm._check_mode_and_host) == ["auto", "h"]
    assert shm_comm._decode(enc(["/a", 2, 64]), "x", shm_comm._check_address) == ["/a", 2, 64]
    assert shm_comm._decode(enc([True, 1.0, 2.0]), "x", shm_comm._check_decision) == [True, 1.0, 2.0]
    for raw, check in [
        (enc(["nccl", "h"]), shm_comm._check_mode_and_host),
        (enc({"name": "/a"}), shm_comm._check_address),
        (enc(["/a", "2", 64]), shm_comm._check_address),
        (enc([1, 1.0, 2.0]), shm_comm._check_decision),
        (enc(7), shm_comm._check_error),
        (b"\xc1", shm_comm._check_error),  # never valid msgpack
        (b"\x80\x04K\x01.", shm_comm._check_error),  # a pickle: not msgpack of a str or nil
    ]:
        with pytest.raises(RuntimeError, match="malformed what in the shm set-up"):
            shm_comm._decode(raw, "what", check)


def test_host_key_separates_host_ids_not_network_namespaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same boot, /dev/shm and pid namespace: one key; SHARDLINE_HOST_ID splits it."""
    from shardline.model.parallel.shm_comm import ENV_HOST_ID, host_key

    monkeypatch.delenv(ENV_HOST_ID, raising=False)
    plain = host_key()
    boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    shm = os.stat("/dev/shm")
    assert boot in plain and f"{shm.st_dev}:{shm.st_ino}" in plain
    assert os.readlink("/proc/self/ns/pid") in plain
    assert os.readlink("/proc/self/ns/net") not in plain
    monkeypatch.setenv(ENV_HOST_ID, "node-a")
    node_a = host_key()
    monkeypatch.setenv(ENV_HOST_ID, "node-b")
    assert len({plain, node_a, host_key()}) == 3


def test_forced_gloo_routes_through_torch_distributed(tmp_path: pathlib.Path) -> None:
    results = _spawn(tmp_path, 2, ["collectives"], ["gloo", "gloo"])
    for r in results:
        assert r["backend"] == "gloo" and not r["has_comm"]
        assert r["mapped_after_init"] == []
    _assert_matches_gloo([r["collectives"] for r in results], 2)


@pytest.mark.parametrize(
    ("modes", "want"),
    [(["auto", "auto"], None), ([None, None], None), (["gloo", "shm"], "gloo"),
     (["shm", "gloo"], "shm")],
    ids=["auto", "unset-is-auto", "rank0-gloo-decides", "rank0-shm-decides"],
)  # fmt: skip
def test_ranks_agree_on_the_choice(tmp_path: pathlib.Path, modes: list[str | None],
                                   want: str | None) -> None:  # fmt: skip
    results = _spawn(tmp_path, 2, [], modes)
    backends = {r["backend"] for r in results}
    assert len(backends) == 1, backends
    (backend,) = backends
    assert backend == want if want else backend in ("shm", "gloo")
    assert all(r["has_comm"] == (backend == "shm") for r in results)


def test_names_are_unlinked_after_setup_and_unmapped_at_destroy(tmp_path: pathlib.Path) -> None:
    results = _spawn(tmp_path, 3, ["collectives"], ["shm"] * 3)
    # One segment, mapped by every rank, no longer named once every rank attached.
    mapped = {tuple(r["mapped_after_init"]) for r in results}
    assert len(mapped) == 1 and len(next(iter(mapped))) == 1, mapped
    for r in results:
        assert r["names_after_init"] == []
        assert r["closed_after_destroy"] is True
        assert r["names_after_destroy"] == [] and r["mapped_after_destroy"] == []


def test_a_dead_peer_fails_the_collective_instead_of_hanging(tmp_path: pathlib.Path) -> None:
    results = _spawn(tmp_path, 2, ["peer_dies"], ["shm", "shm"])
    assert results[1] is None  # it left before saving anything
    assert "died" in results[0]["peer_dies"], results[0]["peer_dies"]
    assert results[0]["peer_dies_s"] < 30


def test_the_sweep_removes_names_of_a_killed_creator() -> None:
    """SIGKILLed between creating and unlinking: the names it leaves are swept by the next start."""
    from shardline.transport.shm_ring import sweep_stale
    from support.leaks import our_shm_entries, owner_pid

    code = ("import os, signal, sys; from shardline.model.parallel.shm_comm import ShmCommunicator; "
            "comm = ShmCommunicator.create(3, 4096); print('made', flush=True); "
            "sys.stdin.readline(); os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"made\n"
            names = [n for n in our_shm_entries() if owner_pid(n) == proc.pid]
            assert len(names) == 4, names  # the segment and one semaphore per rank
            proc.communicate(b"go\n", timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL
    removed = sweep_stale()
    assert set(names) <= set(removed)
    assert not [n for n in our_shm_entries() if owner_pid(n) == proc.pid]


def test_tiny_llama_tp2_over_shm_matches_tp1(tmp_path: pathlib.Path, worker_module: Any) -> None:
    from shardline.model.config import ModelConfig
    from shardline.model.loader import load_model
    from shardline.model.parallel_context import ParallelContext
    from support.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "llama", arch="LlamaForCausalLM", num_heads=4,
                               num_kv_heads=2, vocab_size=321)  # fmt: skip
    results = _spawn(tmp_path, 2, ["model"], ["shm", "shm"], model_path=str(path))
    config = ModelConfig.from_path(path)
    single = worker_module.run_scenario(load_model(config, ParallelContext.single()),
                                        config.hf_config.vocab_size)  # fmt: skip
    for r in results:
        assert r["backend"] == "shm"
        for name, want in single.items():
            got = r["logits"][name]
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= 1e-5, (name, err)
    # Both ranks computed the same logits to the bit (one summation order everywhere).
    for name in single:
        assert torch.equal(results[0]["logits"][name], results[1]["logits"][name]), name


def test_an_unknown_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardline.model.parallel.shm_comm import requested_mode

    monkeypatch.setenv("SHARDLINE_TP_ALLREDUCE", "nccl")
    with pytest.raises(ValueError, match="SHARDLINE_TP_ALLREDUCE"):
        requested_mode()
    monkeypatch.setenv("SHARDLINE_TP_ALLREDUCE", " SHM ")
    assert requested_mode() == "shm"


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]))
