"""`shardline::gguf_gemm` on Llama-3.2-1B's MLP shapes (8192x2048, 2048x8192), Q4_K and Q6_K,
1 and 16 rows, 2 threads: median of 15 calls after 3 warm-ups, per build.

`--before DIR` also times the extension built with DIR's copy of the kernel sources (e.g. an
older `src/model/csrc`, from `git show <commit>:src/model/csrc/gguf_gemm.cpp` beside the
rest), alternating with the working tree's, each in a fresh process, `--rounds` times.
Weights are random K-quant blocks with bounded scales (tests/support/gguf_models.py).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

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
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    out = {}
    for name in ("Q4_K", "Q6_K"):
        for n, k in ((8192, 2048), (2048, 8192)):
            blocks = quantized_bytes(np.broadcast_to(np.float32(0), (n, k)), name, rng)
            w = torch.from_numpy(np.ascontiguousarray(blocks))
            for m in (1, 16):
                x, o = torch.randn(m, k), torch.empty(m, n)
                for _ in range(3):
                    torch.ops.shardline.gguf_gemm(o, x, w, TYPES[name][0], None)
                times = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    torch.ops.shardline.gguf_gemm(o, x, w, TYPES[name][0], None)
                    times.append(time.perf_counter() - t0)
                out[f"{name} {n}x{k} M={m}"] = statistics.median(times) * 1e3
    print(json.dumps(out))
""")


def run(source: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, source, str(ROOT / "tests")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default=None, help="a csrc directory to time against")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    builds = ([args.before] if args.before else []) + ["tree"]
    runs: dict[str, list[dict[str, float]]] = {b: [] for b in builds}
    for _ in range(args.rounds):
        for build in builds:
            runs[build].append(run(build))
    for key in runs["tree"][0]:
        cells = []
        for build in builds:
            values = [r[key] for r in runs[build]]
            runs_text = "/".join(f"{v:.2f}" for v in values)
            cells.append(f"{build[-12:]}: {statistics.median(values):6.2f} ms ({runs_text})")
        print(f"{key:22}  " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
