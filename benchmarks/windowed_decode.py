"""Decode step time of the windowed / soft-capped attention path (issue 24) against Llama's.

Layers with a sliding window or attention soft-capping attend request by request (gathers of the
window's blocks and one SDPA, or a manual soft-capped softmax, per request), where a plain Llama
layer's decode batch runs the fused paged-decode kernel in one call. This builds three random
models of the same shape with transformers' own classes -- Llama, Mistral (every layer sliding)
and Gemma 2 (alternating sliding/global layers, every layer soft-capped) -- serves each with the
engine (16 concurrent greedy requests, 128-token prompts, 64 new tokens each) and reports the
decode step time: (last token - last first token) / (new tokens - 1), median over repeats, the
models alternating.

    python benchmarks/windowed_decode.py [--repeats 3] [--requests 16] [--window 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time

SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 0,
    "pad_token_id": 0,
}


def build(root: pathlib.Path, name: str, window: int) -> pathlib.Path:
    import torch
    import transformers

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from support.tiny_models import write_tiny_tokenizer

    extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": window}),
        "gemma2": (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            {"sliding_window": window, "query_pre_attn_scalar": 64},
        ),
    }[name]
    config = getattr(transformers, extra[0])(**{**SHAPE, **extra[2]})
    torch.manual_seed(0)
    model = getattr(transformers, extra[1])(config).to(torch.float32)
    out = root / name
    model.save_pretrained(out)
    write_tiny_tokenizer(out)
    return out


async def decode_step_ms(
    path: pathlib.Path, requests: int, prompt_len: int, new_tokens: int
) -> float:
    from shardline.engine import Engine, EngineConfig, SamplingParams

    config = EngineConfig(model=str(path), max_model_len=1024, num_kv_blocks=1024, block_size=16)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + j) % 250 + 1 for j in range(prompt_len)] for i in range(requests)]
    first: list[float] = []
    last: list[float] = []
    async with await Engine.start(config) as engine:

        async def one(prompt: list[int]) -> None:
            seen = False
            async for _ in engine.generate(prompt, params):
                if not seen:
                    first.append(time.perf_counter())
                    seen = True
            last.append(time.perf_counter())

        await asyncio.gather(*(one(p) for p in prompts))
    return (max(last) - max(first)) / (new_tokens - 1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    names = ("llama", "mistral", "gemma2")
    times: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: build(pathlib.Path(tmp), n, args.window) for n in names}
        for _ in range(args.repeats):
            for name in names:
                times[name].append(
                    asyncio.run(
                        decode_step_ms(paths[name], args.requests, args.prompt_len, args.new_tokens)
                    )
                )
    result = {n: {"median_ms": statistics.median(t), "runs_ms": t} for n, t in times.items()}
    for name in names:
        ratio = result[name]["median_ms"] / result["llama"]["median_ms"]
        print(
            f"{name:8s} decode step {result[name]['median_ms']:7.2f} ms  ({ratio:.2f}x llama)  runs {times[name]}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "result": result}, indent=2)
        )


if __name__ == "__main__":
    main()
