"""Short requests beside a long prefill: time to first token with and without the prefill cap.

A long prompt (default 8,000 tokens) is submitted; once its prefill has started, short
requests (a few tokens each) arrive one by one. Each short request's time to first token is
measured with the scheduler's default `long_prefill_token_threshold` (a quarter of
max_num_batched_tokens while others run or wait) and with the cap off (threshold =
max_num_batched_tokens: the long prompt takes every step's whole budget until it is done).

    python benchmarks/prefill_fairness.py [--long-tokens 8000] [--short 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from shardline import Engine, EngineConfig, SamplingParams


async def run(threshold: int, long_tokens: int, shorts: int) -> dict[str, float]:
    config = EngineConfig(long_prefill_token_threshold=threshold, max_model_len=8192,
                          kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False)
    async with await Engine.start(config) as engine:
        vocab = 49152
        long_prompt = [(1000 + 7 * i) % vocab for i in range(long_tokens)]
        async for _ in engine.generate([5, 6, 7], SamplingParams(max_tokens=2)):  # warm-up
            pass
        started = time.perf_counter()
        long_first: list[float] = []

        async def long_request() -> None:
            async for out in engine.generate(long_prompt, SamplingParams(max_tokens=1, temperature=0)):
                if out.delta_token_ids and not long_first:
                    long_first.append(time.perf_counter() - started)

        async def short_request(i: int) -> float:
            t0 = time.perf_counter()
            async for out in engine.generate([11 + i, 12, 13, 14], SamplingParams(max_tokens=4, temperature=0)):
                if out.delta_token_ids:
                    return time.perf_counter() - t0
            raise RuntimeError("no token")

        task = asyncio.create_task(long_request())
        await asyncio.sleep(0.5)  # the long prefill is under way
        ttfts = []
        for i in range(shorts):
            ttfts.append(await short_request(i))
        await task
    return {"short_ttft_first_s": ttfts[0], "short_ttft_median_s": statistics.median(ttfts), "short_ttft_max_s": max(ttfts),
            "long_ttft_s": long_first[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-tokens", type=int, default=8000)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--thresholds", default="0,2048",
                        help="long_prefill_token_threshold values to compare (0 = the default cap; "
                             "2048 = max_num_batched_tokens, i.e. no cap)")
    args = parser.parse_args()
    results = {}
    for threshold in (int(t) for t in args.thresholds.split(",")):
        name = "default cap" if threshold == 0 else f"threshold {threshold}"
        results[name] = asyncio.run(run(threshold, args.long_tokens, args.short))
        r = results[name]
        print(f"{name:17s} first short TTFT {r['short_ttft_first_s']:6.2f} s, short TTFT median {r['short_ttft_median_s']:6.2f} s, max {r['short_ttft_max_s']:6.2f} s; "
              f"long prompt's first token {r['long_ttft_s']:6.2f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
