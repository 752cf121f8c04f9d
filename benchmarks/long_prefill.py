"""Prefill speed by prompt length, 1k to 32k tokens (issue 25, item 4).

The default model (SmolLM2-135M-Instruct, its Q4_1 GGUF) is trained for 8,192 positions, so
16k and 32k prompts run on a copy of its GGUF whose ``llama.context_length`` says 32,768 (the
weights and rope are unchanged: past 8k the text it would write is meaningless, but the work a
prefill does per token, which is what this measures, is the same). Each prompt is distinct
random token ids (no prefix-cache hit), generated with one new token; the rate is prompt tokens
over time to first token, the median over rounds with the lengths interleaved.

Next to each measured rate the script prints the FLOP model's bound for that length relative to
1k: the linear layers cost 2 x 106M FLOPs per token whatever the length, attention (QK^T and PV,
causal) 4 x (L / 2) x 576 x 30 more at length L, so if attention ran at the GEMMs' FLOP rate the
rate at L could not exceed (linear + attention at 1k) / (linear + attention at L) of the 1k rate.

    python benchmarks/long_prefill.py [--lengths 1024,4096,8192,16384,32768] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

LINEAR_FLOPS = 2 * 106e6  # per token: SmolLM2-135M's 30 decoder layers (the LM head runs once)
ATTENTION_FLOPS_PER_POSITION = 4 * 576 * 30 / 2  # per token and prompt length (causal: L/2 keys)


def flop_bound(length: int, base: int) -> float:
    """The longest prompt's rate relative to `base`'s if attention ran at the GEMMs' FLOP rate."""
    return (LINEAR_FLOPS + ATTENTION_FLOPS_PER_POSITION * base) / (
        LINEAR_FLOPS + ATTENTION_FLOPS_PER_POSITION * length
    )


def long_context_copy(root: pathlib.Path, context: int) -> pathlib.Path:
    from shardline.model.fetch import fetch_default_model

    source = next(fetch_default_model().glob("*.gguf"))
    target = root / source.name
    shutil.copyfile(source, target)
    subprocess.run(
        [
            str(pathlib.Path(sys.executable).with_name("gguf-set-metadata")),
            str(target),
            "llama.context_length",
            str(context),
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    return target


async def measure(
    model: pathlib.Path, lengths: list[int], rounds: int, chunk: int
) -> dict[int, list[float]]:
    from shardline.engine import Engine, EngineConfig, SamplingParams

    longest = max(lengths)
    config = EngineConfig(
        model=str(model),
        max_model_len=longest + 16,
        max_num_seqs=4,
        kv_cache_memory_bytes=(longest + 64) * 30 * 2 * 3 * 64 * 4,
        max_num_batched_tokens=chunk,
        long_prefill_token_threshold=chunk,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    rates: dict[int, list[float]] = {n: [] for n in lengths}
    async with await Engine.start(config) as engine:
        # Warm-up: first-call costs (kernel load, allocator growth) out of the measured rounds.
        async for _ in engine.generate([rng.randrange(100, 40000) for _ in range(512)], params):
            pass
        for r in range(rounds):
            order = lengths if r % 2 == 0 else lengths[::-1]
            for n in order:
                prompt = [rng.randrange(100, 40000) for _ in range(n)]
                start = time.perf_counter()
                async for _ in engine.generate(prompt, params):
                    pass
                elapsed = time.perf_counter() - start
                rates[n].append(n / elapsed)
                print(
                    f"round {r + 1}: {n:>6} tokens {elapsed:7.2f} s  {n / elapsed:7.1f} tok/s",
                    flush=True,
                )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--chunk",
        type=int,
        default=2048,
        help="max_num_batched_tokens and long_prefill_token_threshold",
    )
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    lengths = sorted(int(x) for x in args.lengths.split(","))
    with tempfile.TemporaryDirectory(prefix="shardline-long-prefill-") as tmp:
        model = long_context_copy(pathlib.Path(tmp), max(max(lengths) + 1024, 8192))
        rates = asyncio.run(measure(model, lengths, args.rounds, args.chunk))
    base = lengths[0]
    base_rate = statistics.median(rates[base])
    print(f"\n{platform.processor() or platform.machine()}, chunk {args.chunk}")
    print("| prompt tokens | prefill tok/s (median) | vs 1k | FLOP-model bound vs 1k |")
    print("|---|---|---|---|")
    for n in lengths:
        rate = statistics.median(rates[n])
        print(f"| {n} | {rate:.1f} | {rate / base_rate:.2f}x | {flop_bound(n, base):.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({str(n): rates[n] for n in lengths}, indent=1))


if __name__ == "__main__":
    main()
