"""Decode speed and memory with a float32, float16 and bfloat16 KV cache (`kv_cache_dtype`).

The default model (SmolLM2-135M's GGUF, packed as a worker packs it) decodes 16 sequences
together at a long context (2,048 tokens each by default), greedy, one token per sequence a
step: the decode kernel reads every sequence's whole context each step, so the KV bytes read
per step (16 x 2,048 x 30 layers x 2 x 3 KV heads x 64 x 4 bytes = 1.5 GiB in float32) dominate
the weights' 0.1 GiB. The cache is filled with random K/V (the kernel's work does not depend on
the values; a 32k-token prefill would take minutes on 2 cores), then `--steps` decode steps are
timed after `--warmup`. Each dtype runs in a fresh process (its RSS is the model, the cache
and the interpreter), the dtypes alternating over `--rounds`; the table gives each one's median
tok/s and its ratio to float32's in the same round.

    python benchmarks/kv_dtype.py [--rounds 3] [--streams 16] [--context 2048] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

DTYPES = ("float32", "float16", "bfloat16")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def child(dtype_name: str, streams: int, context: int, steps: int, warmup: int) -> dict[str, float]:
    import psutil
    import torch

    from shardline.model.attention import Attention, AttentionMetadata
    from shardline.model.config import ModelConfig
    from shardline.model.fetch import fetch_default_model
    from shardline.model.packed_linear import load_packed_model
    from shardline.model.parallel_context import ParallelContext
    from shardline.worker.kv_cache import allocate_kv_cache

    dtype = getattr(torch, dtype_name)
    block = 16
    model, _ = load_packed_model(
        ModelConfig.from_path(fetch_default_model()), ParallelContext.single()
    )
    per_seq = -(-(context + warmup + steps + 1) // block)
    total = allocate_kv_cache(
        model, streams * per_seq + 1, block_size=block, dtype=dtype, device=torch.device("cpu")
    )
    gen = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, Attention):  # random K/V of a trained model's scale
            layer.kv_cache.copy_(torch.randn(layer.kv_cache.shape, generator=gen))
    tables = [[1 + i + j * streams for j in range(per_seq)] for i in range(streams)]
    tokens = torch.randint(100, 20000, (streams,), generator=gen)
    done = context
    times = []
    with torch.inference_mode():
        for step in range(warmup + steps):
            attn = AttentionMetadata.build(
                query_lens=[1] * streams,
                context_lens=[done] * streams,
                block_tables=tables,
                block_size=block,
            )
            started = time.perf_counter()
            logits = model.compute_logits(model(tokens, torch.full((streams,), done), attn))
            tokens = logits.argmax(dim=-1)
            if step >= warmup:
                times.append(time.perf_counter() - started)
            done += 1
    return {
        "tok_s": streams * len(times) / sum(times),
        "step_ms": 1000 * statistics.median(times),
        "rss_mib": psutil.Process().memory_info().rss / 2**20,
        "kv_mib": total / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.streams, args.context, args.steps, args.warmup)))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    runs: dict[str, list[dict[str, float]]] = {d: [] for d in DTYPES}
    for round_index in range(args.rounds):
        order = DTYPES if round_index % 2 == 0 else DTYPES[::-1]
        for dtype in order:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    dtype,
                    "--streams",
                    str(args.streams),
                    "--context",
                    str(args.context),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[dtype].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1} {dtype:9s} {runs[dtype][-1]}", flush=True)
    print(
        f"\n{args.streams} streams x {args.context}-token context, {args.steps} timed decode steps, "
        f"{args.rounds} rounds (load {os.getloadavg()[0]:.1f})"
    )
    print(
        "| KV dtype | KV cache MiB | RSS MiB | decode tok/s (median) | step ms | vs float32 (per round) |"
    )
    print("|---|---|---|---|---|---|")
    summary = {}
    for dtype in DTYPES:
        ratios = [
            r["tok_s"] / b["tok_s"] for r, b in zip(runs[dtype], runs["float32"], strict=True)
        ]
        summary[dtype] = {
            "tok_s": statistics.median(r["tok_s"] for r in runs[dtype]),
            "step_ms": statistics.median(r["step_ms"] for r in runs[dtype]),
            "rss_mib": statistics.median(r["rss_mib"] for r in runs[dtype]),
            "kv_mib": runs[dtype][0]["kv_mib"],
            "ratios": ratios,
        }
        s = summary[dtype]
        print(
            f"| {dtype} | {s['kv_mib']:.0f} | {s['rss_mib']:.0f} | {s['tok_s']:.1f} | {s['step_ms']:.1f} | "
            f"{', '.join(f'{x:.2f}x' for x in ratios)} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "runs": runs,
                    "summary": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
