"""Engine step overhead: decoded tokens/s with a model that returns instantly.

The model is `model.standin` (ShardlineStandInForCausalLM): no math, a deterministic varied
token per position, SmolLM2's real tokenizer (so detokenization costs what it costs). What is
left is the engine itself: scheduling, building and encoding each ExecuteStep, the transport
both ways, the worker's input building and sampling, update_from_output, detokenization,
publishing RequestOutputs and waking every consumer, which reads every output.

    python benchmarks/step_overhead.py [--num-requests 256] [--max-tokens 300]
        [--transports shm,inproc] [--phases] [--profile FILE] [--write-results]

`--phases` turns on the engine's and the worker's perf_counter phase timers
(SHARDLINE_STEP_TIMING=1) and prints where a step's time goes; it runs as a separate pass so
the headline tokens/s is measured without them. `--profile FILE` runs cProfile over the
engine's process (the shm worker is another process and is not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET_TOKENS_PER_S = 50_000


def make_model_dir() -> pathlib.Path:
    """The stand-in model directory, with SmolLM2's tokenizer files (fetched once)."""
    from shardline.model.fetch import fetch_default_model
    from shardline.model.standin import write_standin_model_dir

    target = pathlib.Path(tempfile.gettempdir()) / f"shardline-standin-{os.getuid()}"
    return write_standin_model_dir(target, fetch_default_model())


def make_prompts(tokenizer: Any, num_requests: int) -> list[list[int]]:
    """Distinct short chat prompts (distinct, so the prefix cache does not shortcut prefill)."""
    prompts = []
    for i in range(num_requests):
        text = f"Request {i}: write a long story about the number {i * 7919 % 10007}."
        prompts.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return prompts


async def run_once(
    model_dir: pathlib.Path, transport: str, num_requests: int, max_tokens: int, profile: str | None
) -> dict[str, Any]:
    """One engine, every request submitted at once; returns the measured numbers."""
    from shardline.engine import Engine, EngineConfig, SamplingParams

    blocks_per_request = -(-(64 + max_tokens) // 16) + 1
    config = EngineConfig(
        model=str(model_dir),
        plugins=("shardline.model.standin:register",),
        transport=transport,  # type: ignore[arg-type]
        max_num_seqs=num_requests,
        max_num_batched_tokens=max(8192, num_requests * 64),
        num_kv_blocks=num_requests * blocks_per_request + 64,
        max_model_len=4096,
        num_threads=1,
        worker_timeout=30.0,
    )
    engine = await Engine.start(config)
    try:
        prompts = make_prompts(engine.tokenizer, num_requests)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        # Warm-up: a few requests through every code path once.
        await asyncio.gather(*(_consume(engine, p, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)) for p in prompts[:8]))
        steps_before = engine.stats().num_steps
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        start = time.perf_counter()
        results = await asyncio.gather(*(_consume(engine, p, params) for p in prompts))
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        steps = engine.stats().num_steps - steps_before
        tokens = sum(r["tokens"] for r in results)
        wakeups = sum(r["outputs"] for r in results)
        assert all(r["tokens"] == max_tokens for r in results), "a request produced the wrong count"
        assert all(r["text_chars"] > 0 for r in results), "no text was detokenized"
        return {
            "transport": transport,
            "tokens": tokens,
            "seconds": elapsed,
            "tokens_per_s": tokens / elapsed,
            "steps": steps,
            "steps_per_s": steps / elapsed,
            "outputs_read": wakeups,
            "ms_per_step": 1000 * elapsed / max(1, steps),
        }
    finally:
        await engine.aclose()


async def _consume(engine: Any, prompt: list[int], params: Any) -> dict[str, int]:
    tokens = outputs = chars = 0
    async for out in engine.generate(prompt, params):
        outputs += 1
        tokens += len(out.delta_token_ids)
        chars += len(out.delta)
    return {"tokens": tokens, "outputs": outputs, "text_chars": chars}


def print_phases(path: pathlib.Path) -> dict[str, Any]:
    """Print the phase timers the engine and its worker wrote (SHARDLINE_STEP_TIMING_FILE)."""
    data: dict[str, Any] = {}
    for file in sorted(path.parent.glob(path.name + "*")):
        data[file.name] = json.loads(file.read_text())
    for name, phases in data.items():
        steps = max(1, phases.pop("_steps", 1))
        total = sum(phases.values())
        print(f"  {name} ({steps} steps)")
        for phase, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"    {phase:<34} {1e6 * seconds / steps:9.1f} us/step  {100 * seconds / max(total, 1e-9):5.1f} %")
        phases["_steps"] = steps
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--transports", default="shm,inproc")
    parser.add_argument("--repeats", type=int, default=1, help="runs per transport (best is reported)")
    parser.add_argument("--phases", action="store_true", help="also run once with the phase timers on")
    parser.add_argument("--profile", default=None, help="cProfile the engine process into FILE")
    parser.add_argument("--json", default=None, help="write the numbers as JSON to FILE")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    model_dir = make_model_dir()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"workload: {args.num_requests} concurrent streaming requests x {args.max_tokens} tokens (ignore_eos, greedy)")
    report: dict[str, Any] = {"runs": [], "phases": {}}
    for transport in args.transports.split(","):
        runs = [
            asyncio.run(run_once(model_dir, transport, args.num_requests, args.max_tokens, args.profile))
            for _ in range(args.repeats)
        ]
        best = max(runs, key=lambda r: r["tokens_per_s"])
        best["all_tokens_per_s"] = [round(r["tokens_per_s"]) for r in runs]
        report["runs"].append(best)
        verdict = "meets" if best["tokens_per_s"] >= TARGET_TOKENS_PER_S else "below"
        print(
            f"{transport:>7}: {best['tokens_per_s']:9.0f} tokens/s ({verdict} the {TARGET_TOKENS_PER_S} target; "
            f"runs {best['all_tokens_per_s']}, median {statistics.median(best['all_tokens_per_s']):.0f}), "
            f"{best['steps_per_s']:.0f} steps/s, {best['ms_per_step']:.2f} ms/step, "
            f"{best['outputs_read']} outputs read"
        )
        if args.phases:
            timing = pathlib.Path(tempfile.mkdtemp()) / "phases"
            os.environ["SHARDLINE_STEP_TIMING_FILE"] = str(timing)
            try:
                run = asyncio.run(run_once(model_dir, transport, args.num_requests, args.max_tokens, None))
            finally:
                del os.environ["SHARDLINE_STEP_TIMING_FILE"]
            print(f"  with timers on: {run['tokens_per_s']:.0f} tokens/s, {run['ms_per_step']:.2f} ms/step")
            report["phases"][transport] = {"run": run, "phases": print_phases(timing)}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
