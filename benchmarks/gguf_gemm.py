"""`shardline::gguf_gemm` on Llama-3.2-1B's MLP shapes (8192x2048, 2048x8192): Q4_K, Q5_K,
Q6_K and Q8_0 weights by 1, 4, 16, 64 and 256 rows, 2 threads (`--threads`); the median of
several calls (15 up to 16 rows, 5 above) after warm-ups, per build, in ms and GFLOP/s (2 M N K
flops), timed by the wall clock or (`--clock cpu`, for one thread on a loaded machine) by the
process's CPU time.

`--before DIR` also times the extension built with DIR's copy of the kernel sources (e.g. an
older `src/model/csrc`, from `git show <commit>:src/model/csrc/gguf_gemm.cpp` beside the
rest), alternating with the working tree's, each in a fresh process, `--rounds` times.
Weights are random K-quant blocks with bounded scales (tests/support/gguf_models.py).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from startup import _python_child  # noqa: E402

CHILD = textwrap.dedent("""
    import json, pathlib, statistics, sys, time
    import numpy as np, torch
    sys.path.insert(0, sys.argv[2])
    from support.gguf_models import quantized_bytes
    from shardline.model import paged_decode
    from shardline.model.gguf_weights import TYPES
    if sys.argv[1] != "tree":
        src = pathlib.Path(sys.argv[1])
        paged_decode.KERNEL = paged_decode.KernelBuild(tuple(src / p.name for p in paged_decode.SOURCES))
    assert paged_decode.KERNEL.load(), paged_decode.KERNEL.error
    threads, clock = int(sys.argv[5]), getattr(time, sys.argv[6])
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out = {}
    for name in sys.argv[3].split(","):
        for n, k in ((8192, 2048), (2048, 8192)):
            blocks = quantized_bytes(np.broadcast_to(np.float32(0), (n, k)), name, rng)
            w = torch.from_numpy(np.ascontiguousarray(blocks))
            for m in map(int, sys.argv[4].split(",")):
                x, o = torch.randn(m, k), torch.empty(m, n)
                calls = 15 if m <= 16 else 5
                for _ in range(2 if m > 16 else 3):
                    torch.ops.shardline.gguf_gemm(o, x, w, TYPES[name][0], None)
                times = []
                for _ in range(calls):
                    t0 = clock()
                    torch.ops.shardline.gguf_gemm(o, x, w, TYPES[name][0], None)
                    times.append(clock() - t0)
                out[f"{name} {n}x{k} M={m}"] = statistics.median(times) * 1e3
    print(json.dumps(out))
""")


def run(source: str, args: argparse.Namespace) -> dict[str, float]:
    clock = "perf_counter" if args.clock == "wall" else "process_time"
    return _python_child(CHILD, None, source, str(ROOT / "tests"), args.types, args.rows, str(args.threads),
                         clock, timeout=None)


def gflops(key: str, ms: float) -> float:
    """2 M N K flops in `ms` milliseconds, from a key like 'Q4_K 8192x2048 M=16'."""
    _, shape, rows = key.split()
    n, k = map(int, shape.split("x"))
    return 2 * int(rows[2:]) * n * k / (ms * 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default=None, help="a csrc directory to time against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0")
    parser.add_argument("--rows", default="1,4,16,64,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time (with --threads 1, robust to other load on the machine)",
    )
    args = parser.parse_args(argv)
    builds = ([args.before] if args.before else []) + ["tree"]
    runs: dict[str, list[dict[str, float]]] = {b: [] for b in builds}
    for _ in range(args.rounds):
        for build in builds:
            runs[build].append(run(build, args))
    for key in runs["tree"][0]:
        cells = []
        medians = []
        for build in builds:
            values = [r[key] for r in runs[build]]
            medians.append(statistics.median(values))
            runs_text = "/".join(f"{v:.2f}" for v in values)
            cells.append(
                f"{build[-12:]}: {medians[-1]:7.2f} ms {gflops(key, medians[-1]):6.1f} GFLOP/s"
                f" ({runs_text})"
            )
        ratio = f"   x{medians[0] / medians[-1]:.2f}" if len(builds) > 1 else ""
        print(f"{key:22}  " + "   ".join(cells) + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
