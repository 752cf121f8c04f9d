"""Time to first token and inter-token latency with prefix caching off and on, for a shared-system-prompt workload.

Every request is SmolLM2's chat template around one long system prompt (the same for all)
and a short, different user question; requests arrive at a steady Poisson rate. With prefix
caching on, the system prompt's full KV blocks are computed once and reused, so only the
question is prefilled.

    python benchmarks/prefix_cache_bench.py [--num-requests 16] [--rate 1.0] [--max-tokens 32]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the workers; see throughput.py

import argparse
import asyncio
import json
import pathlib
import random
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from throughput import TOPICS, pct  # noqa: E402

SYSTEM = (
    "You are the support assistant of a company that sells bicycles, coffee machines and "
    "garden tools. Answer politely and briefly, cite the relevant policy when it applies, "
    "never invent prices, and offer to connect the customer with a human when unsure. "
    "Policies: returns within 30 days with a receipt; warranty two years on frames and one "
    "year on electrical parts; free shipping above fifty euros; repairs take five to ten "
    "working days; spare parts are listed in the online catalogue under each product page. "
) * 3


async def run(model_dir: str, prompts: list[list[int]], rate: float, caching: bool, max_tokens: int) -> dict[str, Any]:
    from shardline.engine import Engine, EngineConfig, SamplingParams

    cfg = EngineConfig(model=model_dir, enable_prefix_caching=caching, max_model_len=1024)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    ttft: list[float] = []
    itl: list[float] = []  # per token after the first, between the outputs that carried them
    async with await Engine.start(cfg) as engine:
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=2)):  # warm-up, no shared prefix
            pass

        async def one(prompt: list[int]) -> None:
            sent = time.perf_counter()
            last = None
            async for out in engine.generate(prompt, params):
                if not out.delta_token_ids:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - sent)
                else:
                    itl.extend([(now - last) / len(out.delta_token_ids)] * len(out.delta_token_ids))
                last = now

        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        stats = engine.stats()
    return {"caching": caching, "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
            "prompt_tokens_computed": stats.prompt_tokens_computed, "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/out/prefix_cache.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from shardline.model.fetch import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for i in range(args.num_requests):
        ids = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: tell me about {TOPICS[i % len(TOPICS)]}."}],
            add_generation_prompt=True, tokenize=True,
        )  # fmt: skip
        prompts.append([int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)])
    rows = [asyncio.run(run(model_dir, prompts, args.rate, caching, args.max_tokens)) for caching in (False, True)]
    off, on = rows
    print(f"{args.num_requests} requests at {args.rate}/s, prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, shared system prompt")
    for r in rows:
        print(f"prefix caching {'on ' if r['caching'] else 'off'}: TTFT p50 {r['ttft_p50_ms']:7.0f} ms  p99 {r['ttft_p99_ms']:7.0f} ms  "
              f"ITL p50 {r['itl_p50_ms']:5.0f} ms  p99 {r['itl_p99_ms']:5.0f} ms  "
              f"prompt tokens computed {r['prompt_tokens_computed']}  cache-hit tokens {r['prefix_cache_hit_tokens']}")
    speedup = off["ttft_p50_ms"] / on["ttft_p50_ms"]
    print(f"TTFT p50 speed-up from prefix caching: {speedup:.2f}x")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "ttft_p50_speedup": speedup}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
