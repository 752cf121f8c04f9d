"""Decode speed and memory with a float32, float16 and bfloat16 KV cache (`kv_cache_dtype`).

The default model (SmolLM2-135M's GGUF, packed as a worker packs it) decodes 16 sequences
together at a long context (2,048 tokens each by default), greedy, one token per sequence a
step: the decode kernel reads every sequence's whole context each step, so the KV bytes read
per step (16 x 2,048 x 30 layers x 2 x 3 KV heads x 64 x 4 bytes = 1.5 GiB in float32) dominate
the weights' 0.1 GiB. The caches are filled with random K/V (the kernel's work does not depend
on the values; a 32k-token prefill would take minutes on 2 cores).

Speed: one process holds a cache of each dtype (allocated as the worker allocates them) and
the decode steps alternate between them, `--rounds` rounds of one step per dtype after
`--warmup` rounds, so that every dtype sees the same machine load (a shared 2-core machine's
load moves step times by 2x within minutes: separate runs per dtype measured that, not the
cache). Memory: each dtype in a fresh process holding only its cache: RSS after the cache is
filled (the model, the cache and the interpreter).

    python benchmarks/kv_dtype.py [--rounds 12] [--streams 16] [--context 2048] [--kernel]

`--kernel` times the decode kernel alone on one layer's shape instead of the model's steps.
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
BLOCK = 16


def load_model():  # type: ignore[no-untyped-def]
    from shardline.model.config import ModelConfig
    from shardline.model.fetch import fetch_default_model
    from shardline.model.packed_linear import load_packed_model
    from shardline.model.parallel_context import ParallelContext
    from shardline.worker.heap import release_free_memory

    model, _ = load_packed_model(
        ModelConfig.from_path(fetch_default_model()), ParallelContext.single()
    )
    release_free_memory()  # as the worker does after packing
    return model


def filled_cache(model, dtype_name: str, blocks: int) -> tuple[list, int]:  # type: ignore[no-untyped-def]
    """Allocate the model's caches in `dtype_name` (as a worker does) and fill them with random
    K/V; returns the per-layer tensors and their bytes."""
    import torch

    from shardline.model.attention import Attention
    from shardline.worker.kv_cache import allocate_kv_cache

    total = allocate_kv_cache(
        model,
        blocks,
        block_size=BLOCK,
        dtype=getattr(torch, dtype_name),
        device=torch.device("cpu"),
    )
    gen = torch.Generator().manual_seed(0)
    caches = [m.kv_cache for m in model.modules() if isinstance(m, Attention)]
    for cache in caches:
        cache.normal_(generator=gen)  # in place: no float32 temporary in the RSS
    return caches, total


def rss_child(dtype_name: str, blocks: int) -> dict[str, float]:
    import psutil

    model = load_model()
    _, total = filled_cache(model, dtype_name, blocks)
    return {"rss_mib": psutil.Process().memory_info().rss / 2**20, "kv_mib": total / 2**20}


def alternate_steps(streams: int, context: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Step times (ms) per dtype, the dtypes taking turns step by step."""
    import torch

    from shardline.model.attention import Attention, AttentionMetadata

    model = load_model()
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    per_seq = -(-(context + warmup + rounds + 1) // BLOCK)
    blocks = streams * per_seq + 1
    caches = {d: filled_cache(model, d, blocks)[0] for d in DTYPES}
    tables = [[1 + i + j * streams for j in range(per_seq)] for i in range(streams)]
    tokens = {d: torch.randint(100, 20000, (streams,)) for d in DTYPES}
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    with torch.inference_mode():
        for step in range(warmup + rounds):
            done = context + step
            order = DTYPES if step % 2 == 0 else DTYPES[::-1]
            for dtype in order:
                for layer, cache in zip(layers, caches[dtype], strict=True):
                    layer.kv_cache = cache
                attn = AttentionMetadata.build(
                    query_lens=[1] * streams,
                    context_lens=[done] * streams,
                    block_tables=tables,
                    block_size=BLOCK,
                )
                started = time.perf_counter()
                logits = model.compute_logits(
                    model(tokens[dtype], torch.full((streams,), done), attn)
                )
                tokens[dtype] = logits.argmax(dim=-1)
                if step >= warmup:
                    times[dtype].append(1000 * (time.perf_counter() - started))
    return times


def kernel_only(streams: int, context: int, rounds: int) -> dict[str, list[float]]:
    """The decode kernel alone on one SmolLM2 layer's shape (9 query heads, 3 KV heads, head_dim
    64): ms per call over `streams` sequences of `context` tokens in shuffled blocks, the
    dtypes taking turns."""
    import torch

    from shardline.model import paged_decode

    paged_decode.KERNEL.require()
    blocks = streams * context // BLOCK + 1
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(blocks, 2, BLOCK, 3, 64, generator=gen)
    caches = {d: base.to(getattr(torch, d)) for d in DTYPES}
    order = torch.randperm(blocks - 1, generator=gen) + 1
    tables = order.view(streams, -1).to(torch.int32).contiguous()
    lens = torch.full((streams,), context, dtype=torch.int32)
    starts = torch.arange(streams + 1, dtype=torch.int32)
    query = torch.randn(streams, 9, 64, generator=gen)
    out = torch.empty_like(query)
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    for _ in range(rounds):
        for dtype, cache in caches.items():
            started = time.perf_counter()
            for _ in range(5):
                paged_decode.paged_decode_attention(
                    out, query, cache, tables, lens, starts, None, 0.125
                )
            times[dtype].append(1000 * (time.perf_counter() - started) / 5)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kernel", action="store_true", help="time the decode kernel alone")
    parser.add_argument("--rss-child", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.blocks)))
        return
    if args.kernel:
        times = kernel_only(args.streams, args.context, args.rounds)
        print(
            f"decode kernel alone, one layer (9/3 heads, d64), {args.streams} x {args.context} tokens "
            f"(load {os.getloadavg()[0]:.1f}): ms per call, median / min"
        )
        for dtype in DTYPES:
            print(
                f"  {dtype:9s} {statistics.median(times[dtype]):.2f} / {min(times[dtype]):.2f}  "
                f"({statistics.median(times['float32']) / statistics.median(times[dtype]):.2f}x float32's median)"
            )
        return
    load = [os.getloadavg()[0]]
    times = alternate_steps(args.streams, args.context, args.rounds, args.warmup)
    load.append(os.getloadavg()[0])
    per_seq = -(-(args.context + args.warmup + args.rounds + 1) // BLOCK)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    memory = {}
    for dtype in DTYPES:
        command = [
            sys.executable,
            __file__,
            "--rss-child",
            dtype,
            "--blocks",
            str(args.streams * per_seq + 1),
        ]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        memory[dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{args.streams} streams x {args.context}-token context, {args.rounds} alternating decode "
        f"steps per dtype (load {load[0]:.1f} -> {load[1]:.1f})"
    )
    print("| KV dtype | KV cache MiB | RSS MiB | step ms (median) | decode tok/s | vs float32 |")
    print("|---|---|---|---|---|---|")
    summary = {}
    base = statistics.median(times["float32"])
    for dtype in DTYPES:
        step = statistics.median(times[dtype])
        summary[dtype] = {
            **memory[dtype],
            "step_ms": step,
            "tok_s": args.streams * 1000 / step,
            "speedup": base / step,
            "steps_ms": times[dtype],
        }
        s = summary[dtype]
        print(
            f"| {dtype} | {s['kv_mib']:.0f} | {s['rss_mib']:.0f} | {step:.1f} | {s['tok_s']:.1f} | "
            f"{s['speedup']:.2f}x |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "load": load,
                    "summary": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
