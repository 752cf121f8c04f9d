"""The `ray` executor backend on a two-node Ray cluster made on this machine
(`ray.cluster_utils.Cluster`, two CPUs per node). A rank asks for `num_threads` CPUs: with
`num_threads=2` a node holds one rank (what does not fit on the engine's node goes to the
other, over TCP), with the default (1) a node holds two, and placement alone decides whether
pipeline stages and replicas are spread. Slow: Ray's processes start in seconds each."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import psutil
import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams, cli
from shardline.engine.config import ConfigError
from shardline.engine.executor import WorkerFailure
from support.generation import generate_all
from support.leaks import our_shm_entries
from support.waiting import wait_until

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'shardline[ray]' (the test extra has it)"
)
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["hello world", "the quick brown fox", "abc", "a longer prompt that spans a few blocks"]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
_NODE = {"num_cpus": 2, "object_store_memory": 80 << 20}
_ONE_RANK_A_NODE = {"num_threads": 2}  # a rank asks for a node's two CPUs


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head node and one more, two CPUs each; this process is the driver, on the head."""
    made = Cluster(initialize_head=True, head_node_args={**_NODE, "include_dashboard": False})
    try:
        made.add_node(**_NODE)
        made.wait_for_nodes()
        ray.init(address=made.address, logging_level="WARNING")
        yield made
    finally:
        ray.shutdown()
        made.shutdown()


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(
        model=str(path), max_model_len=256, num_kv_blocks=64, block_size=4
    )
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def _local(path: pathlib.Path, **kw: object) -> list[list[int]]:
    """The greedy tokens of PROMPTS from a local `mp` engine."""

    async def run() -> list[list[int]]:
        async with await Engine.start(_cfg(path, **kw)) as engine:
            return await generate_all(engine, PROMPTS, PARAMS)

    return anyio.run(run)


@pytest.fixture(scope="module")
def local_tokens(tiny_llama_dir: pathlib.Path) -> list[list[int]]:
    """The greedy tokens of the local `mp` run with TP = 2."""
    return _local(tiny_llama_dir, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def local_pp_tokens(tiny_llama_dir: pathlib.Path) -> list[list[int]]:
    """The greedy tokens of the local `mp` run with PP = 2."""
    return _local(tiny_llama_dir, pipeline_parallel_size=2)


@pytest.fixture(scope="module")
def local_single_tokens(tiny_llama_dir: pathlib.Path) -> list[list[int]]:
    """The greedy tokens of the local `mp` run with one rank."""
    return _local(tiny_llama_dir)


def _ray_ranks(engine: Engine) -> list[Any]:
    """Every replica's RayRanks."""
    return [core.executor._ray for core in engine._cores]


def _our_shm() -> list[str]:
    return [n for n in our_shm_entries() if f"shardline_{os.getpid()}_" in n]


def _live_actors() -> list[str]:
    """Actors of the cluster that are not dead (read from Ray's GCS; no dashboard needed)."""
    from ray._private import state

    return [actor_id for actor_id, info in state.actors().items() if info["State"] != "DEAD"]


def _live_groups() -> list[str]:
    return [
        pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"
    ]


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    leaves = [exc]
    while any(hasattr(e, "exceptions") for e in leaves):
        leaves = [x for e in leaves for x in getattr(e, "exceptions", [e])]
    return leaves


async def _assert_all_gone(pids: list[int]) -> None:
    """After aclose(): no worker program, actor, placement group or shm name left."""
    await wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), deadline_s=30)
    await wait_until(lambda: not _live_groups(), deadline_s=30)
    await wait_until(lambda: not _live_actors(), deadline_s=30)
    assert not _our_shm()


def _worker_pids(engine: Engine) -> list[int]:
    pids = [pid for core in engine._cores for pid in core.executor.worker_pids]
    assert pids and all(psutil.pid_exists(p) for p in pids)
    return pids


def _ray_cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    return _cfg(
        path, **{"distributed_executor_backend": "ray", "worker_start_timeout": 120.0, **kw}
    )


async def _run_on_ray(
    config: EngineConfig,
    prompts: list[str],
    after_close: Callable[[], None] = lambda: None,
) -> tuple[list[list[int]], list[list[str]], str]:
    """Greedy tokens of `prompts` on Ray, the Ray node id each replica's ranks reported (in rank
    order) and the engine's node id; then (after `after_close`) checks that aclose() left
    nothing behind."""
    async with await Engine.start(config) as engine:
        replicas = _ray_ranks(engine)
        placed = [[h.node_id for h in r.ranks.values()] for r in replicas]
        (engine_node,) = {r.engine_node_id for r in replicas}
        tokens = await generate_all(engine, prompts, PARAMS)
        pids = _worker_pids(engine)
    after_close()
    await _assert_all_gone(pids)
    return tokens, placed, engine_node


def _other_node(engine_node: str) -> str:
    """The id of the cluster's node that is not the engine's."""
    (other,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != engine_node]
    return other


async def test_tp2_across_two_ray_nodes_same_tokens_as_local(
    cluster: Cluster,
    tiny_llama_dir: pathlib.Path,
    local_tokens: list[list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TP group larger than any node (2 ranks of 2 CPUs, nodes of 2): it spans both nodes."""
    caplog.set_level(logging.INFO, logger="shardline.executor")
    config = _ray_cfg(tiny_llama_dir, tensor_parallel_size=2, **_ONE_RANK_A_NODE)
    tokens, placed, engine_node = await _run_on_ray(config, PROMPTS)
    # rank 0 on the engine's node (shm), rank 1 on the other (TCP)
    assert placed == [[engine_node, _other_node(engine_node)]]
    assert tokens == local_tokens
    assert any(
        "no Ray node can hold a pipeline stage's 2 ranks" in w and "TP group spans nodes" in w
        for w in _warnings(caplog)
    ), _warnings(caplog)


@pytest.fixture
async def big_node(cluster: Cluster) -> AsyncIterator[str]:
    """A third, bigger node (4 CPUs) for one test: Ray's least-used node. Its id."""
    big = cluster.add_node(**{**_NODE, "num_cpus": 4})
    cluster.wait_for_nodes()
    try:
        yield big.node_id
    finally:
        cluster.remove_node(big)
        await wait_until(
            lambda: not any(n["Alive"] and n["NodeID"] == big.node_id for n in ray.nodes()),
            deadline_s=60,
        )


async def test_tp2_ranks_packed_on_one_node_where_they_fit(
    big_node: str, tiny_llama_dir: pathlib.Path, local_tokens: list[list[int]]
) -> None:
    """Every node holds both ranks of the TP group: they share one node, the engine's (shared
    memory to rank 0), not the big node Ray would pick on its own."""
    tokens, placed, engine_node = await _run_on_ray(
        _ray_cfg(tiny_llama_dir, tensor_parallel_size=2), PROMPTS
    )
    assert placed == [[engine_node, engine_node]]
    assert tokens == local_tokens


async def test_pp2_stages_spread_over_two_nodes_that_each_fit_both(
    cluster: Cluster, tiny_llama_dir: pathlib.Path, local_pp_tokens: list[list[int]]
) -> None:
    """Either node could hold both stages (PACK would put them together): they are spread,
    stage 0 on the engine's node, stage 1 (over TCP) on the other."""
    tokens, placed, engine_node = await _run_on_ray(
        _ray_cfg(tiny_llama_dir, pipeline_parallel_size=2), PROMPTS
    )
    assert placed == [[engine_node, _other_node(engine_node)]]
    assert tokens == local_pp_tokens


async def test_dp2_replicas_spread_even_where_one_node_is_emptier(
    big_node: str, tiny_llama_dir: pathlib.Path, local_single_tokens: list[list[int]]
) -> None:
    """Every node could hold both one-rank replicas, and Ray's own choice (its least-used node,
    for each group on its own) would put both on the big node. Replica 0 goes to the engine's
    node (shared memory), replica 1 to another."""
    tokens, placed, engine_node = await _run_on_ray(
        _ray_cfg(tiny_llama_dir, data_parallel_size=2), PROMPTS * 2
    )
    (first,), (second,) = placed
    assert first != second  # one node each
    assert first == engine_node
    assert tokens == local_single_tokens * 2


@pytest.fixture
def other_node_full(cluster: Cluster) -> Iterator[Any]:
    """A placement group of the test's taking the CPUs of the node that is not the engine's:
    only the engine's node has room. The group (removed at teardown at the latest)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    engine_node = ray.get_runtime_context().get_node_id()
    blocker = placement_group(
        [{"CPU": 2.0}], bundle_label_selector=[{"ray.io/node-id": _other_node(engine_node)}]
    )
    ray.get(blocker.ready(), timeout=60)
    try:
        yield blocker
    finally:
        if ray.util.placement_group_table(blocker)["state"] != "REMOVED":
            remove_placement_group(blocker)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_pp2_on_the_one_node_with_room_shares_it_and_logs_why(
    other_node_full: Any,
    tiny_llama_dir: pathlib.Path,
    local_pp_tokens: list[list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the engine's node has room: both stages run there, a warning says the stages share
    it, and the tokens are the same."""
    from ray.util.placement_group import remove_placement_group

    caplog.set_level(logging.INFO, logger="shardline.executor")
    tokens, placed, engine_node = await _run_on_ray(
        _ray_cfg(tiny_llama_dir, pipeline_parallel_size=2),
        PROMPTS,
        after_close=lambda: remove_placement_group(other_node_full),
    )
    assert placed == [[engine_node, engine_node]]
    assert tokens == local_pp_tokens
    assert any(
        "replica 0: its 2 pipeline stages share Ray node(s)" in w and "no room" in w
        for w in _warnings(caplog)
    ), _warnings(caplog)


async def test_dp2_on_the_one_node_with_room_shares_it_and_logs_why(
    other_node_full: Any,
    tiny_llama_dir: pathlib.Path,
    local_single_tokens: list[list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replica 1 first asks for a node other than replica 0's; Ray has no room there, so it is
    placed again anywhere: on the engine's node too, with a warning saying so."""
    from ray.util.placement_group import remove_placement_group

    caplog.set_level(logging.INFO, logger="shardline.executor")
    tokens, placed, engine_node = await _run_on_ray(
        _ray_cfg(tiny_llama_dir, data_parallel_size=2),
        PROMPTS * 2,
        after_close=lambda: remove_placement_group(other_node_full),
    )
    assert placed == [[engine_node], [engine_node]]
    assert tokens == local_single_tokens * 2
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("replica 1: Ray has no room for" in m and "away from 1 node" in m for m in infos)
    assert any(
        "replica 1 shares Ray node(s)" in w and "no room for it elsewhere" in w
        for w in _warnings(caplog)
    ), _warnings(caplog)


async def test_tp2_pp2_each_stage_packed_on_its_own_node(
    cluster: Cluster, tiny_llama_dir: pathlib.Path
) -> None:
    """Four one-CPU ranks on two nodes of two CPUs: each stage's TP pair shares a node, stage 0
    the engine's."""
    layout = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    async with await Engine.start(_cfg(tiny_llama_dir, **layout)) as engine:
        local = await generate_all(engine, PROMPTS, PARAMS)
    tokens, placed, engine_node = await _run_on_ray(_ray_cfg(tiny_llama_dir, **layout), PROMPTS)
    other = _other_node(engine_node)
    assert placed == [[engine_node, engine_node, other, other]]
    assert tokens == local


async def test_tp2_with_no_room_for_the_pair_on_one_node_spans_two(
    cluster: Cluster,
    tiny_llama_dir: pathlib.Path,
    local_tokens: list[list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each node could hold the TP pair but has one CPU taken: the stage's bundle gets no room,
    is given up (logged), and one bundle per rank puts a rank on each node."""
    from ray.util.placement_group import placement_group, remove_placement_group

    half = placement_group([{"CPU": 1.0}] * 2, strategy="STRICT_SPREAD")
    ray.get(half.ready(), timeout=60)
    caplog.set_level(logging.INFO, logger="shardline.executor")
    try:
        tokens, placed, engine_node = await _run_on_ray(
            _ray_cfg(tiny_llama_dir, tensor_parallel_size=2),
            PROMPTS,
            after_close=lambda: remove_placement_group(half),
        )
    finally:
        if ray.util.placement_group_table(half)["state"] != "REMOVED":
            remove_placement_group(half)
    assert placed == [[engine_node, _other_node(engine_node)]]
    assert tokens == local_tokens
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(
        "Ray has no room for one bundle {'CPU': 2.0} per pipeline stage, STRICT_PACK; "
        "trying one bundle {'CPU': 1.0} per rank, PACK" in m
        for m in infos
    ), infos


async def test_killed_rank_actor_mid_stream_recovers_with_the_same_tokens(
    cluster: Cluster, tiny_llama_dir: pathlib.Path, local_tokens: list[list[int]]
) -> None:
    config = _ray_cfg(
        tiny_llama_dir, tensor_parallel_size=2, max_worker_restarts=1, restart_backoff=0.1
    )
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    async with await Engine.start(config) as engine:
        expected = await generate_all(engine, PROMPTS[:1], params)
        (ranks,) = _ray_ranks(engine)
        victim = ranks.ranks[1]
        tokens: list[int] = []
        async for out in engine.generate(PROMPTS[0], params):
            tokens = out.token_ids
            if len(tokens) >= 3 and engine.stats().num_restarts == 0 and victim.is_alive():
                ray.kill(victim.actor)
        assert [tokens] == expected
        assert engine.stats().num_restarts == 1
        assert "its Ray actor died" in victim.exit_reason()[1]
        # placed again as before: the pair on the engine's node (its resources released first)
        (again,) = _ray_ranks(engine)
        assert [h.node_id for h in again.ranks.values()] == [ranks.engine_node_id] * 2
        assert await generate_all(engine, PROMPTS[:1], params) == expected
        pids = [victim.pid, *_worker_pids(engine)]
    await _assert_all_gone(pids)


async def test_unplaceable_replica_fails_with_a_clear_error_then_a_fitting_one_serves(
    cluster: Cluster, tiny_llama_dir: pathlib.Path
) -> None:
    """A rank asking for 3 CPUs (num_threads = 3) on nodes of two CPUs each: the placement
    group never fits; the start fails naming it and leaves no placement group; the next engine
    serves."""
    config = _cfg(
        tiny_llama_dir, num_threads=3, distributed_executor_backend="ray", worker_start_timeout=3.0
    )
    with pytest.raises(BaseException) as caught:  # noqa: PT011 - unwrapped below
        async with await Engine.start(config):
            pass
    leaves = _leaves(caught.value)
    failures = [str(e) for e in leaves if isinstance(e, WorkerFailure)]
    assert (
        failures
        and "Ray could not place replica 0's 1 ranks ({'CPU': 3.0} each) in 3 s" in failures[0]
    ), leaves
    await wait_until(lambda: not _live_groups(), deadline_s=30)
    async with await Engine.start(
        _cfg(tiny_llama_dir, distributed_executor_backend="ray")
    ) as engine:
        assert len((await generate_all(engine, PROMPTS[:1], PARAMS))[0]) == 10


def test_ray_backend_without_ray_is_refused_in_one_line(
    tiny_llama_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    with pytest.raises(
        ConfigError, match=r"distributed_executor_backend.*pip install 'shardline\[ray\]'"
    ):
        _cfg(tiny_llama_dir, distributed_executor_backend="ray")
    assert (
        cli.main(
            [
                "generate",
                "hi",
                "--model",
                str(tiny_llama_dir),
                "--distributed-executor-backend",
                "ray",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "distributed_executor_backend" in err and "shardline[ray]" in err and "\n" not in err
    # the mp backend is unaffected
    _cfg(tiny_llama_dir)


def test_ray_fields_are_refused_where_they_do_not_apply(tiny_llama_dir: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="ray_address"):
        _cfg(tiny_llama_dir, ray_address="auto")
    with pytest.raises(ConfigError, match="distributed_executor_backend"):
        _cfg(tiny_llama_dir, distributed_executor_backend="k8s")
    with pytest.raises(ConfigError, match="transport"):
        _cfg(tiny_llama_dir, distributed_executor_backend="ray", transport="inproc")
    with pytest.raises(ConfigError, match="nodes"):
        _cfg(
            tiny_llama_dir,
            distributed_executor_backend="ray",
            tensor_parallel_size=2,
            nodes=2,
            head_port=1,
            tcp_token="t",
        )


async def test_lost_node_whose_ranks_cannot_be_placed_again_fails_the_requests_clearly(
    cluster: Cluster, tiny_llama_dir: pathlib.Path
) -> None:
    """The second node dies mid-stream: its rank's actor dies with it, the replica restarts,
    and its placement group (two ranks of 2 CPUs, one node of 2 left) cannot be made again: the
    stream fails naming why, and the engine's aclose() leaves nothing behind. (Runs last: it
    adds a node back.)"""
    config = _ray_cfg(
        tiny_llama_dir,
        tensor_parallel_size=2,
        **_ONE_RANK_A_NODE,
        worker_start_timeout=20.0,
        max_worker_restarts=1,
        restart_backoff=0.1,
    )
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    (other,) = [node for node in cluster.list_all_nodes() if node is not cluster.head_node]
    try:
        async with await Engine.start(config) as engine:
            pids = _worker_pids(engine)
            with pytest.raises(BaseException) as caught:  # noqa: PT011 - unwrapped below
                async for out in engine.generate(PROMPTS[0], params):
                    if len(out.token_ids) == 3:
                        cluster.remove_node(other)
            text = " | ".join(str(e) for e in _leaves(caught.value))
            assert "Ray could not place replica 0's 2 ranks" in text, text
        await _assert_all_gone(pids)
    finally:
        cluster.add_node(**_NODE)
        cluster.wait_for_nodes()


def test_unreachable_ray_address_fails_the_start_naming_it(tiny_llama_dir: pathlib.Path) -> None:
    """A `--ray-address` Ray cannot join: the command fails with one line naming it (in its own
    process: this one has joined the test cluster already)."""
    argv = ["generate", "hi", "--model", str(tiny_llama_dir), "--max-tokens", "3"]
    argv += ["--distributed-executor-backend", "ray", "--ray-address", "not a cluster"]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from shardline.engine.cli import main; sys.exit(main())",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "shardline generate: worker group failed: cannot join the Ray cluster at 'not a cluster'"
    ), last
