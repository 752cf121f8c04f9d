"""Speculative decoding (issue 25, item 2): one stream's tokens/s with and without n-gram drafts.

Workload: input-grounded, as the issue asks: a chat request on the default model
(SmolLM2-135M-Instruct) to edit a given text (fix its spelling, change nothing else) and one to
summarise it; greedy, `max_tokens=M`, one request at a time (single stream). Two engines are up
at once, one plain and one with `speculative_config` (ngram, k drafts); rounds alternate between
them (plain, spec, plain, spec, ...) so that load changes hit both alike.

Reported per engine, as medians over the rounds:

* decode tokens/s: (tokens - 1) / (last token time - first token time), what speculation speeds;
* end-to-end tokens/s: tokens / (finish - submit), prefill included;
* the speedup spec / plain of both, and the draft acceptance rate and mean acceptance length
  (1 + accepted tokens per verified draft, vLLM's definition);
* whether the two engines produced the same tokens (greedy: they must).

    python benchmarks/speculative.py [--rounds 5] [--max-tokens 160] [--k 4] [--lookup-min 1]

`--draft-model PATH` measures a draft model instead of n-gram lookup. `--draft-pair` builds the
one pair this machine has the means for (no hub): the target is SmolLM2-135M-Instruct as a
float32 checkpoint (transformers loads the default GGUF; every linear weight then gets uniform
noise of +-d/2 per block of 32, d the block's Q4_1 step, i.e. the size of the rounding Q4_1
applies, so the target is a float32 model whose Q4_1 quantization is the default GGUF, as a
user's own float model is to its quantized copy) and the draft is the default model itself
(Q4_1, ~5x fewer bytes a step). Written once to `$SHARDLINE_HOME/bench/smollm2-f32-noised`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any

from shardline.engine import Engine, EngineConfig, SamplingParams

TEXT = (
    "The old lighthouse stood on the northern cliff for more than two hundred years. Every evening "
    "the keeper climbed the hundred and twelve steps of its spiral stair, trimed the wick, polished "
    "the great lens and lit the lamp before the first ship apeared on the horizon. In the morning he "
    "wrote the weather, the wind and the ships he had seen in a leather logbook that the harbour "
    "master collected once a month. When the light was finally automated, the keeper moved to a "
    "small cottage in the village, but he still walked up to the cliff every evening to watch the "
    "beam sweep across the water, as if to make sure it had not forgoten its work."
)
TASKS = {
    "edit": f"Fix the spelling mistakes in the following text. Change nothing else and output the whole "
    f"corrected text only.\n\n{TEXT}",
    "summarise": f"Summarise the following text in a few sentences, reusing its own words.\n\n{TEXT}",
}


async def one(engine: Engine, prompt: str, params: SamplingParams) -> dict[str, Any]:
    start = time.perf_counter()
    times: list[float] = []
    tokens: list[int] = []
    async for out in engine.chat([{"role": "user", "content": prompt}], params):
        now = time.perf_counter()
        times.extend([now] * len(out.delta_token_ids))
        tokens = out.token_ids
    end = time.perf_counter()
    decode = (
        (len(tokens) - 1) / (times[-1] - times[0])
        if len(tokens) > 1 and times[-1] > times[0]
        else 0.0
    )
    return {"tokens": tokens, "decode_tps": decode, "e2e_tps": len(tokens) / (end - start)}


def build_draft_pair(seed: int = 0) -> pathlib.Path:
    """The float32 target described in the module docstring (built once); returns its folder."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from shardline.model.fetch import fetch_default_model, shardline_home

    out = shardline_home() / "bench" / "smollm2-f32-noised"
    if (out / "model.safetensors").exists():
        return out
    source = fetch_default_model()
    gguf = next(source.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2 or param.shape[1] % 32 or "norm" in name:
                continue
            blocks = param.view(param.shape[0], -1, 32)
            step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
            blocks += (torch.rand(blocks.shape, generator=gen) - 0.5) * step
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)  # (save_pretrained refuses a model loaded from a GGUF)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"))  # (the head is tied to the embedding)
    for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(source / extra, out / extra)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--lookup-max", type=int, default=4)
    parser.add_argument("--lookup-min", type=int, default=1)
    parser.add_argument("--draft-model", help="a draft model (method draft_model) instead of ngram")
    parser.add_argument("--draft-pair", action="store_true",
                        help="target: the float32 SmolLM2 built here; draft: the default model")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.draft_pair:
        args.model = str(build_draft_pair())
        args.draft_model = "smollm2-135m-instruct"
    spec: dict[str, Any] = {
        "method": "ngram",
        "num_speculative_tokens": args.k,
        "prompt_lookup_max": args.lookup_max,
        "prompt_lookup_min": args.lookup_min,
    }
    if args.draft_model:
        spec = {"model": args.draft_model, "num_speculative_tokens": args.k}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    plain_cfg = EngineConfig(model=args.model, max_model_len=2048, log_stats_interval=0)
    spec_cfg = EngineConfig(
        model=args.model, max_model_len=2048, log_stats_interval=0, speculative_config=spec
    )
    results: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "config": vars(args),
        "tasks": {},
    }
    async with await Engine.start(plain_cfg) as plain, await Engine.start(spec_cfg) as fast:
        for name, prompt in TASKS.items():
            await one(plain, prompt, params)  # warm-up (and the prefix cache) for both
            await one(fast, prompt, params)
            rows: dict[str, list[dict[str, Any]]] = {"plain": [], "spec": []}
            for _ in range(args.rounds):
                rows["plain"].append(await one(plain, prompt, params))
                rows["spec"].append(await one(fast, prompt, params))
            same = all(
                a["tokens"] == b["tokens"] for a, b in zip(rows["plain"], rows["spec"], strict=True)
            )
            summary: dict[str, Any] = {
                "tokens": len(rows["plain"][0]["tokens"]),
                "same_tokens": same,
            }
            for kind in ("plain", "spec"):
                for measure in ("decode_tps", "e2e_tps"):
                    summary[f"{kind}_{measure}"] = statistics.median(r[measure] for r in rows[kind])
            summary["decode_speedup"] = summary["spec_decode_tps"] / summary["plain_decode_tps"]
            summary["e2e_speedup"] = summary["spec_e2e_tps"] / summary["plain_e2e_tps"]
            results["tasks"][name] = summary
            print(f"{name}: {json.dumps(summary)}", flush=True)
        stats = fast.stats()
    results["acceptance_rate"] = stats.spec_num_accepted_tokens / max(
        stats.spec_num_draft_tokens, 1
    )
    results["mean_acceptance_length"] = 1 + stats.spec_num_accepted_tokens / max(
        stats.spec_num_drafts, 1
    )
    results["accepted_per_pos"] = stats.spec_accepted_per_pos
    results["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in results.items() if k != "tasks"}), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")  # noqa: ASYNC240


if __name__ == "__main__":
    asyncio.run(main())
