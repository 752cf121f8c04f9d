"""Structured output at batch speed (issue 22): constrained vs free tokens/s in one batch.

Workload: N concurrent chat requests on the default model (SmolLM2-135M-Instruct), half with a
JSON schema (cycling through tests/support/json_schemas.py), half free; every request
`max_tokens=M`, `ignore_eos` (a free request makes exactly M tokens; a constrained one makes M
unless its grammar completes first), greedy (both classes cost the same per token to sample).

Reported per class, for each way of running constrained requests under async scheduling
(`EngineCore.one_step_while_constrained`: False = a constrained request sits out the step sent
while its previous token is in flight, the free ones keep two steps in flight; True = one step in
flight while any constrained request is live):

* decode tokens/s per request: (tokens - 1) / (last token time - first token time), mean over
  the class: how fast a request of that class streams once it started;
* class throughput: the class's tokens / (its last finish - the batch's start);
* the ratio constrained / free of both (the issue's target: >= 0.9); and the paired ratio:
  for each constrained request, its tokens over its decode interval divided by the mean tokens
  a free request (decoding over the whole interval) made in that same interval, averaged over
  the constrained requests. Constrained requests finish early (their grammar completes) while
  the batch is still busier, so the paired ratio is the like-for-like one.

Plus an all-free batch of the same size (the engine's speed without any grammar), and schema
compile time over the suite: the compiler's set-up (llguidance's tokenizer), each schema cold
(a fresh compiler) and cached (the same spec again).

    python benchmarks/structured_output_throughput.py [--num-requests 64] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from support.json_schemas import SCHEMAS  # noqa: E402


def _messages(i: int, schema: dict[str, Any] | None) -> list[dict[str, str]]:
    if schema is None:
        return [{"role": "user", "content": f"Tell me a long story about the number {i}."}]
    return [{"role": "user", "content": f"Example {i}: a JSON value matching {json.dumps(schema)}"}]


async def _run_batch(engine: Any, n: int, max_tokens: int, constrained: bool) -> dict[str, Any]:
    from shardline.engine import SamplingParams
    from shardline.engine.structured_output import StructuredOutputSpec

    timings: dict[str, list[tuple[int, float]]] = {"constrained": [], "free": []}
    times: dict[str, list[list[float]]] = {"constrained": [], "free": []}
    finishes: dict[str, list[float]] = {"constrained": [], "free": []}
    tokens: dict[str, int] = {"constrained": 0, "free": 0}
    start = time.monotonic()

    async def one(i: int) -> None:
        schema = SCHEMAS[(i // 2) % len(SCHEMAS)][1] if constrained and i % 2 == 0 else None
        spec = None if schema is None else StructuredOutputSpec.json(schema)
        kind = "free" if spec is None else "constrained"
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, structured_output=spec
        )
        first = last = None
        count = 0
        stamps: list[float] = []
        times[kind].append(stamps)
        async for out in engine.chat(_messages(i, schema), params):
            if out.delta_token_ids:
                now = time.monotonic()
                first = first or now
                last = now
                count += len(out.delta_token_ids)
                stamps.extend([now] * len(out.delta_token_ids))
        tokens[kind] += count
        finishes[kind].append(time.monotonic())
        if first is not None and last is not None and count > 1 and last > first:
            timings[kind].append((count, (count - 1) / (last - first)))

    await asyncio.gather(*(one(i) for i in range(n)))
    out: dict[str, Any] = {}
    for kind in ("constrained", "free"):
        if not finishes[kind]:
            continue
        rates = [rate for _, rate in timings[kind]]
        out[kind] = {
            "requests": len(finishes[kind]),
            "tokens": tokens[kind],
            "mean_tokens_per_request": tokens[kind] / len(finishes[kind]),
            "decode_tok_s_per_request": statistics.mean(rates) if rates else None,
            "class_throughput_tok_s": tokens[kind] / (max(finishes[kind]) - start),
        }
    out["wall_s"] = time.monotonic() - start
    if "constrained" in out and "free" in out:
        c, f = out["constrained"], out["free"]
        out["ratio_decode_per_request"] = (
            c["decode_tok_s_per_request"] / f["decode_tok_s_per_request"]
        )
        out["ratio_class_throughput"] = c["class_throughput_tok_s"] / f["class_throughput_tok_s"]
        out["ratio_paired"] = _paired_ratio(times["constrained"], times["free"])
    return out


def _paired_ratio(constrained: list[list[float]], free: list[list[float]]) -> float | None:
    ratios = []
    for stamps in constrained:
        if len(stamps) < 3:
            continue
        begin, end = stamps[0], stamps[-1]
        counts = [
            sum(begin < t <= end for t in f) for f in free if f and f[0] <= begin and f[-1] >= end
        ]
        if counts and statistics.mean(counts) > 0:
            ratios.append((len(stamps) - 1) / statistics.mean(counts))
    return statistics.mean(ratios) if ratios else None


def compile_times(tokenizer_json: str, eos: list[int], vocab_size: int) -> dict[str, float]:
    from shardline.engine.structured_output import GrammarCompiler, StructuredOutputSpec

    started = time.perf_counter()
    compiler = GrammarCompiler(tokenizer_json, eos_token_ids=eos, vocab_size=vocab_size)
    setup = time.perf_counter() - started
    specs = [StructuredOutputSpec.json(schema) for _, schema in SCHEMAS]
    cold, cached = [], []
    for spec in specs:
        t = time.perf_counter()
        compiler.compile(spec)
        cold.append(time.perf_counter() - t)
    for spec in specs:
        t = time.perf_counter()
        compiler.compile(spec)
        cached.append(time.perf_counter() - t)
    return {
        "compiler_setup_s": setup,
        "cold_mean_ms": 1e3 * statistics.mean(cold),
        "cold_max_ms": 1e3 * max(cold),
        "cached_mean_ms": 1e3 * statistics.mean(cached),
        "cached_max_ms": 1e3 * max(cached),
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    from shardline.engine import Engine, EngineConfig
    from shardline.model.fetch import resolve_model_path

    path = resolve_model_path(args.model)
    cfg = EngineConfig(
        model=str(path), max_model_len=1024, kv_cache_memory_bytes=args.kv_cache_memory_bytes
    )
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "load_before": os.getloadavg(),
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "compile": compile_times((path / "tokenizer.json").read_text(), [2], 49152),
    }
    async with await Engine.start(cfg) as engine:
        await _run_batch(engine, 4, 4, constrained=True)  # warm-up (and the engine's compiler)
        core = engine._cores[0]
        for repeat in range(args.repeat):
            report[f"all_free_{repeat}"] = await _run_batch(
                engine, args.num_requests, args.max_tokens, False
            )
            for one_step in (False, True):
                core.one_step_while_constrained = one_step
                key = f"mixed_{'one_step' if one_step else 'rows_wait'}_{repeat}"
                report[key] = await _run_batch(engine, args.num_requests, args.max_tokens, True)
            core.one_step_while_constrained = False
    report["load_after"] = os.getloadavg()
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=2 << 30)
    parser.add_argument("--out", default="benchmarks/out/structured_output_throughput.json")
    args = parser.parse_args(argv)
    report = asyncio.run(amain(args))
    text = json.dumps(report, indent=2)
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return report


if __name__ == "__main__":
    main()
