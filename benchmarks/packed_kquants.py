"""GGUF weights in the packed decode GEMM's integer panels against `gguf_gemm`, per GEMM (issue 23).

On Llama-3.2-1B's MLP shapes (8192x2048, 2048x8192), 2 threads, by 1, 16 and 64 rows: Q4_K,
Q5_K and Q6_K weights (random blocks with bounded scales, tests/support/gguf_models.py) run by
`gguf_gemm` on the file's blocks and by `packed_gemm` on their panels with float32 scales
(`packed_linear.gguf_scaled_blocks`); Q4_1 and Q8_0 panels (float16 scales) too. The median of
several calls after warm-ups, in ms, and the bytes each form holds per weight.

`--before DIR` also times the Q4_1 / Q8_0 panels with the extension built from DIR (an older
`src/model/csrc`, e.g. `git archive <commit> src/model/csrc | tar -x -C /tmp/old`), alternating
with the working tree's, each in a fresh process, `--rounds` times: the forms that were there
before, unchanged in speed or not.
"""

from __future__ import annotations

import argparse
import json
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
    from shardline.model import packed_linear, paged_decode
    from shardline.model.gguf_weights import TYPES, GGUFTensor
    tree = sys.argv[1] == "tree"
    if not tree:
        src = pathlib.Path(sys.argv[1])
        paged_decode.KERNEL = paged_decode.KernelBuild(tuple(src / p.name for p in paged_decode.SOURCES))
    assert paged_decode.KERNEL.load(), paged_decode.KERNEL.error
    torch.set_num_threads(int(sys.argv[4]))
    rng = np.random.default_rng(0)
    out = {}

    def timed(key, fn, m):
        for _ in range(3):
            fn()
        times = []
        for _ in range(15 if m <= 16 else 5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[key] = statistics.median(times) * 1e3

    types = ["Q4_1", "Q8_0"] + (["Q4_K", "Q5_K", "Q6_K"] if tree else [])
    for name in types:
        for n, k in ((8192, 2048), (2048, 8192)):
            raw = quantized_bytes(rng.normal(0, 0.05, size=(n, k)), name, rng)
            t = GGUFTensor("w", TYPES[name][0], (n, k), torch.from_numpy(np.ascontiguousarray(raw)))
            if name in packed_linear.GGUF_K_TYPES:
                packed = packed_linear.pack_scaled_blocks(packed_linear.gguf_scaled_blocks(t))
            else:
                packed = packed_linear.pack_blocks(packed_linear.gguf_integer_blocks(t))
            out[f"{name} bytes/weight"] = packed.numel() / (n * k)
            out[f"{name} file bytes/weight"] = t.nbytes / (n * k)
            for m in map(int, sys.argv[3].split(",")):
                x, o = torch.randn(m, k), torch.empty(m, n)
                timed(f"{name} {n}x{k} M={m} panels", lambda: torch.ops.shardline.packed_gemm(o, x, packed, None), m)
                if tree and name in packed_linear.GGUF_K_TYPES:
                    timed(f"{name} {n}x{k} M={m} gguf_gemm",
                          lambda: torch.ops.shardline.gguf_gemm(o, x, t.data, t.type_number, None), m)
    print(json.dumps(out))
""")


def run(source: str, args: argparse.Namespace) -> dict[str, float]:
    return _python_child(CHILD, None, source, str(ROOT / "tests"), args.rows, str(args.threads), timeout=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="a csrc directory to time the Q4_1 / Q8_0 panels against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"tree": [], "before": []}
    for _ in range(args.rounds):
        if args.before is not None:
            runs["before"].append(run(args.before, args))
        runs["tree"].append(run("tree", args))
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for name, rows in runs.items() if rows}
    for key, value in medians["tree"].items():
        before = medians.get("before", {}).get(key)
        extra = f"   before {before:8.3f}" if before is not None else ""
        print(f"{key:40} {value:8.3f}{extra}")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
