"""TP collectives between two local CPU ranks: gloo vs the shared-memory communicator.

Two spawned ranks (one torch thread each, as TP=2 workers run) join a gloo world with
``SHARDLINE_TP_ALLREDUCE=shm``, so each holds both paths over the same TP group. For every
size both are timed back to back, one call at a time; the table gives the median latency per
call over the iterations (the slower rank's median, since a collective waits for both).

    python benchmarks/allreduce_bench.py [--iters 200] [--out benchmarks/out/allreduce.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# (rows, cols) of float32: decode/prefill activations of SmolLM2's hidden size (576) and the
# LM head's logits shard at TP=2 (49152 / 2 = 24576 columns).
REDUCE_SIZES = [(1, 576), (8, 576), (16, 576), (64, 576), (256, 576), (1, 24576), (64, 24576)]
GATHER_SIZES = [(1, 24576), (8, 24576), (64, 24576)]


def _median_s(op: Callable[[], object], iters: int) -> float:
    for _ in range(max(3, iters // 20)):
        op()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _rank(rank: int, init_method: str, iters: int, results: Any) -> None:
    os.environ["SHARDLINE_TP_ALLREDUCE"] = "shm"
    import torch
    import torch.distributed as dist

    from shardline.model.parallel_context import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(rank=rank, world_size=2, tp_size=2, pp_size=1, init_method=init_method)
    assert ctx.tp_comm is not None, ctx.tp_comm_backend
    comm = ctx.tp_comm
    rows = []
    try:
        for op, sizes in (("all_reduce", REDUCE_SIZES), ("all_gather", GATHER_SIZES)):
            for shape in sizes:
                x = torch.zeros(shape)  # stays finite however often it is summed
                n = iters if x.numel() < 100_000 else max(20, iters // 4)
                if op == "all_reduce":
                    gloo = _median_s(lambda: dist.all_reduce(x, group=ctx.tp_group), n)  # noqa: B023
                    shm = _median_s(lambda: comm.all_reduce(x), n)  # noqa: B023
                else:
                    parts = [torch.empty_like(x) for _ in range(2)]

                    def gloo_gather() -> torch.Tensor:
                        dist.all_gather(parts, x, group=ctx.tp_group)  # noqa: B023
                        return torch.cat(parts, dim=-1)  # noqa: B023

                    gloo = _median_s(gloo_gather, n)
                    shm = _median_s(lambda: comm.all_gather(x, dim=-1), n)  # noqa: B023
                rows.append({"op": op, "shape": list(shape), "bytes": x.numel() * 4,
                             "iters": n, "gloo_s": gloo, "shm_s": shm})  # fmt: skip
    finally:
        destroy_distributed()
    results.put((rank, rows))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/out/allreduce.json")
    args = parser.parse_args(argv)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    procs = [
        spawn.Process(target=_rank, args=(r, init_method, args.iters, results)) for r in range(2)
    ]
    for proc in procs:
        proc.start()
    per_rank = dict(results.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    if any(proc.exitcode != 0 for proc in procs):
        sys.exit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    rows = []
    for row0, row1 in zip(per_rank[0], per_rank[1], strict=True):
        gloo, shm = max(row0["gloo_s"], row1["gloo_s"]), max(row0["shm_s"], row1["shm_s"])
        rows.append({**row0, "gloo_s": gloo, "shm_s": shm})
    print(f"2 ranks, float32, median per call over --iters {args.iters} (fewer for >100k elements)")
    print(f"{'op':10} {'shape':>12} {'KiB':>7} {'gloo us':>9} {'shm us':>8} {'speed-up':>8}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['op']:10} {shape:>12} {r['bytes'] / 1024:7.1f} {r['gloo_s'] * 1e6:9.1f} "
              f"{r['shm_s'] * 1e6:8.1f} {r['gloo_s'] / r['shm_s']:7.1f}x")  # fmt: skip
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
