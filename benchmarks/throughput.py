"""Throughput and latency: shardline vs Hugging Face `generate` on the same requests, one run.

Workload (the standard one): N chat prompts of varied length (SmolLM2's chat template),
max_tokens spread evenly over [16, 128], ignore_eos so every request produces exactly what it
asked for. Useful tokens = the sum of each request's max_tokens (padding is not useful).

* shardline: every request submitted at once to one Engine (continuous batching).
* baseline: transformers `generate`, left-padded batches of 16 in arrival order, each batch
  generating up to its longest request (a user's straightforward batched loop). It runs in a
  fresh process once per OpenMP wait policy in `--hf-omp-policies`: `default` is whatever the
  caller's environment says (libgomp's default spins between parallel regions; what a user who
  sets nothing gets), `PASSIVE` sleeps (better on a busy machine). The ratio is taken against
  the fastest, so shardline is compared with transformers at its best on this machine.
* Both sides get the same warm-up before the clock starts: one greedy 4-token request on the
  first prompt (after the engine's start / the model's load).
* Both sides' useful and generated tokens/s are printed. Every row of a transformers batch
  generates as many tokens as the batch's longest request, so it generates more tokens than it
  is credited with (~1.68x for the standard 64-request workload); that factor is printed beside
  the ratio. shardline generates exactly the useful tokens.
* Both sides are greedy on every request, so their outputs are compared: the number of
  requests whose tokens differ and the first differing positions. transformers is run with
  `min_new_tokens` (so each row generates its full length), which forbids EOS; shardline's
  `ignore_eos` does not, so each request is compared up to shardline's first EOS token.
* latency: shardline under a steady Poisson request rate: time to first token and inter-token
  latency percentiles.

    python benchmarks/throughput.py [--num-requests 64] [--rate 1.0] [--skip-hf]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import pathlib
import platform
import random
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

TOPICS = [
    "why the sky is blue", "how a bicycle stays upright", "the history of the printing press",
    "what a hash table is", "how vaccines train the immune system", "the rules of chess",
    "how rainbows form", "what makes bread rise", "the causes of the seasons",
    "how a transistor works", "why cats purr", "how to brew good coffee",
]  # fmt: skip
STYLES = [
    "", "Answer in one paragraph.",
    "Explain it to a ten-year-old, with an example, and keep the tone friendly and encouraging.",
    "Write a detailed answer with an introduction, three numbered key points, a short analogy, "
    "a common misconception and a one-sentence summary at the end. Avoid jargon where you can.",
]


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(tokenizer: Any, num_requests: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts, max_tokens = [], []
    for i in range(num_requests):
        question = f"Tell me about {TOPICS[i % len(TOPICS)]}. {STYLES[rng.randrange(len(STYLES))]}".strip()
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        prompts.append([int(t) for t in ids])
        max_tokens.append(16 + round(112 * i / max(1, num_requests - 1)))
    order = list(range(num_requests))
    rng.shuffle(order)
    return Workload([prompts[i] for i in order], [max_tokens[i] for i in order])


def workload_flops(model_dir: str, work: Workload) -> float:
    """FLOPs the workload needs at the least: every prompt token and every generated token but
    the last goes through the model once (linear layers, attention over its context), and
    each generated token needs one LM-head row (model_bench.step_flops per forward)."""
    from transformers import AutoConfig

    from model_bench import hf_source, step_flops

    folder, extra = hf_source(model_dir)
    cfg = AutoConfig.from_pretrained(folder, **extra)
    total = 0.0
    for prompt, new in zip(work.prompts, work.max_tokens, strict=True):
        total += step_flops(cfg, len(prompt), 0, 1, causal_prefill=True)
        total += sum(step_flops(cfg, 1, len(prompt) + j, 1, causal_prefill=False) for j in range(new - 1))
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


WARMUP_TOKENS = 4  # both sides: one greedy request of this many tokens on the first prompt


async def run_shardline(cfg: Any, work: Workload) -> dict[str, Any]:
    from shardline.engine import Engine, SamplingParams

    async with await Engine.start(cfg) as engine:
        # Warm-up: one short request so start-up costs are not counted (run_hf does the same).
        warmup = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0)
        async for _ in engine.generate(work.prompts[0], warmup):
            pass
        produced = 0
        outputs: list[list[int]] = [[] for _ in work.prompts]

        async def one(i: int) -> None:
            nonlocal produced
            params = SamplingParams(max_tokens=work.max_tokens[i], temperature=0.0, ignore_eos=True)
            async for out in engine.generate(work.prompts[i], params):
                if out.finished:
                    produced += out.num_output_tokens
                    outputs[i] = list(out.token_ids)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
        elapsed = time.perf_counter() - start
        stats = engine.stats()
        eos = sorted(engine.eos_token_ids)
    return {"seconds": elapsed, "tokens": work.useful_tokens, "tokens_per_s": work.useful_tokens / elapsed,
            "generated_tokens": produced, "generated_tokens_per_s": produced / elapsed,
            "steps": stats.num_steps, "outputs": outputs, "eos_token_ids": eos}


async def run_latency(cfg: Any, work: Workload, rate: float, seed: int = 1) -> dict[str, Any]:
    from shardline.engine import Engine, SamplingParams

    rng = random.Random(seed)
    ttft: list[float] = []
    itl: list[float] = []
    async with await Engine.start(cfg) as engine:
        async for _ in engine.generate(work.prompts[0], SamplingParams(max_tokens=4, temperature=0.0)):
            pass

        async def one(i: int) -> None:
            params = SamplingParams(max_tokens=work.max_tokens[i], temperature=0.0, ignore_eos=True)
            sent = time.perf_counter()
            last = None
            async for out in engine.generate(work.prompts[i], params):
                now = time.perf_counter()
                if not out.delta_token_ids:
                    continue
                if last is None:
                    ttft.append(now - sent)
                else:
                    itl.append((now - last) / len(out.delta_token_ids))
                last = now

        tasks = []
        start = time.perf_counter()
        for i in range(len(work.prompts)):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {
        "rate_per_s": rate,
        "seconds": elapsed,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
    }


def run_hf(model_dir: str, work: Workload, batch_size: int, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from model_bench import hf_source

    folder, extra = hf_source(model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, **extra, dtype=getattr(torch, dtype)).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():  # the same warm-up as run_shardline's, before the clock starts
        warm = torch.tensor([work.prompts[0]], device=device)
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=WARMUP_TOKENS,
                       do_sample=False, pad_token_id=pad)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    generated = 0
    outputs: list[list[int]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(work.prompts), batch_size):
            batch = work.prompts[b : b + batch_size]
            longest = max(len(p) for p in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(batch):  # left padding, as generation wants
                ids[row, longest - len(prompt) :] = torch.tensor(prompt)
                mask[row, longest - len(prompt) :] = 1
            new = max(work.max_tokens[b : b + batch_size])
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
            generated += len(batch) * new  # every row runs to the batch's longest request
            for row in range(len(batch)):
                outputs.append(out[row, longest : longest + work.max_tokens[b + row]].tolist())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens": work.useful_tokens, "tokens_per_s": work.useful_tokens / elapsed,
            "generated_tokens": generated, "generated_tokens_per_s": generated / elapsed, "outputs": outputs}


def compare_greedy(ours: list[list[int]], theirs: list[list[int]], eos_ids: list[int]) -> dict[str, Any]:
    """Both sides' greedy outputs, request by request, up to shardline's first EOS token (past
    it transformers' min_new_tokens forbids EOS, shardline's ignore_eos does not): how many
    requests differ, and where each first differs."""
    eos = set(eos_ids)
    first_diffs: list[int] = []
    compared = cut_at_eos = 0
    for mine, hers in zip(ours, theirs, strict=True):
        stop = next((j for j, token in enumerate(mine) if token in eos), len(mine))
        cut_at_eos += stop < len(mine)
        compared += stop
        diff = next((j for j in range(stop) if j >= len(hers) or mine[j] != hers[j]), None)
        if diff is not None:
            first_diffs.append(diff)
    return {"requests": len(ours), "tokens_compared": compared, "requests_cut_at_eos": cut_at_eos,
            "mismatched_requests": len(first_diffs), "first_differing_positions": sorted(first_diffs)}


@contextlib.contextmanager
def _omp_wait_policy(policy: str) -> Iterator[None]:
    """OMP_WAIT_POLICY for processes started inside (`default`: the caller's own setting)."""
    before = os.environ.get("OMP_WAIT_POLICY")
    if policy != "default":
        os.environ["OMP_WAIT_POLICY"] = policy
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = before


def run_hf_isolated(policy: str, *args: Any) -> dict[str, Any]:
    """`run_hf` in a fresh process under OpenMP wait policy `policy` (libgomp reads it once,
    when it loads)."""
    context = multiprocessing.get_context("spawn")
    with _omp_wait_policy(policy), ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_hf, *args).result()


def measure_round(args: Any, cfg: Any, model_dir: str, work: Workload, dtype: str, index: int) -> dict[str, Any]:
    """One round: shardline, the GEMM floor (CPU), then transformers under each wait policy."""
    result: dict[str, Any] = {}
    if args.repeat > 1:
        print(f"-- round {index + 1} of {args.repeat}")
    ours = asyncio.run(run_shardline(cfg, work))
    our_outputs, eos_ids = ours.pop("outputs"), ours.pop("eos_token_ids")
    result["shardline"] = ours
    print(f"shardline : {ours['tokens_per_s']:8.1f} useful tok/s, {ours['generated_tokens_per_s']:8.1f} generated "
          f"tok/s  ({ours['seconds']:.1f} s)")
    if args.device == "cpu":
        # The floor: the workload's FLOPs at the float32 GEMM rate measured now, with the
        # worker's thread count, right after the run (the same machine load).
        import torch

        from model_bench import gemm_rate

        torch.set_num_threads(cfg.threads_per_worker)
        flops, rate = workload_flops(model_dir, work), gemm_rate()
        floor = flops / rate
        result["gemm_floor"] = {"tflop": flops / 1e12, "gflop_per_s": rate / 1e9, "floor_s": floor,
                                "fraction_of_floor": floor / result["shardline"]["seconds"]}
        print(f"GEMM floor: {flops / 1e12:.2f} TFLOP at {rate / 1e9:.0f} GFLOP/s ({cfg.threads_per_worker} threads) = "
              f"{floor:.1f} s; shardline runs at {100 * floor / result['shardline']['seconds']:.0f}% of it")
    if not args.skip_hf:
        runs = {}
        hf_outputs = {}
        for policy in args.hf_omp_policies.split(","):
            runs[policy] = run_hf_isolated(policy, model_dir, work, args.hf_batch_size, args.device, dtype)
            hf_outputs[policy] = runs[policy].pop("outputs")
            print(f"hf batch{args.hf_batch_size:<3}: {runs[policy]['tokens_per_s']:8.1f} useful tok/s, "
                  f"{runs[policy]['generated_tokens_per_s']:8.1f} generated tok/s  "
                  f"({runs[policy]['seconds']:.1f} s, OMP_WAIT_POLICY {policy})")
        best = max(runs, key=lambda policy: runs[policy]["tokens_per_s"])
        result["hf_generate"] = {**runs[best], "omp_wait_policy": best}
        result["hf_generate_by_omp_policy"] = runs
        ratio = result["shardline"]["tokens_per_s"] / result["hf_generate"]["tokens_per_s"]
        padding = result["hf_generate"]["generated_tokens"] / work.useful_tokens
        result["ratio"] = ratio
        result["hf_generated_over_useful"] = padding
        print(f"ratio     : {ratio:8.2f}x useful tok/s (against transformers' fastest, OMP_WAIT_POLICY {best}); "
              f"transformers generated {padding:.2f}x the tokens it is credited with (each row of a batch "
              f"runs to the batch's longest request); generated tok/s ratio "
              f"{result['shardline']['generated_tokens_per_s'] / result['hf_generate']['generated_tokens_per_s']:.2f}x")
        greedy = compare_greedy(our_outputs, hf_outputs[best], eos_ids)
        result["greedy_comparison"] = greedy
        where = ", ".join(map(str, greedy["first_differing_positions"][:20]))
        print(f"greedy    : {greedy['mismatched_requests']} of {greedy['requests']} requests differ"
              + (f" (first differing positions: {where})" if where else "")
              + f"; {greedy['tokens_compared']} tokens compared, {greedy['requests_cut_at_eos']} requests "
              f"compared only up to shardline's first EOS (transformers' min_new_tokens forbids EOS)")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s for the latency run (0 = skip)")
    parser.add_argument("--transport", default="shm")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=2 << 30,
                        help="KV cache for the run (default 2 GiB, room for the whole 64-request "
                             "workload, as a user serving it would configure; the engine's own "
                             "default is sized for one full-length sequence)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of shardline then transformers, alternating (the ratio is their median)")
    parser.add_argument("--hf-omp-policies", default="default,PASSIVE",
                        help="OpenMP wait policies to run the transformers baseline under, comma-separated "
                             "(default: the caller's environment); the ratio uses the fastest")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA (both sides)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="schedule each step after the previous one's result")
    parser.add_argument("--random-weights", action="store_true",
                        help="a random-weight model of the same shape (scaleout_bench's), e.g. where only "
                             "the model's config and tokenizer are at hand")
    parser.add_argument("--out", default="benchmarks/out/throughput.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from shardline.engine import EngineConfig
    from shardline.model.fetch import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    if args.random_weights:
        from scaleout_bench import smollm2_shaped_model

        model_dir = str(smollm2_shaped_model(pathlib.Path("benchmarks/out/smollm2-shaped-8h"), pathlib.Path(model_dir)))
    work = make_workload(AutoTokenizer.from_pretrained(model_dir), args.num_requests)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    cfg = EngineConfig(model=model_dir, transport=args.transport, tensor_parallel_size=args.tensor_parallel_size,
                       max_model_len=1024, device=args.device, dtype=dtype, cuda_graphs=not args.enforce_eager,
                       async_scheduling=not args.no_async_scheduling,
                       kv_cache_memory_bytes=args.kv_cache_memory_bytes if args.device == "cpu" else None)
    print(f"workload: {len(work.prompts)} requests, prompt tokens {min(map(len, work.prompts))}..{max(map(len, work.prompts))} "
          f"(mean {statistics.mean(map(len, work.prompts)):.0f}), useful output tokens {work.useful_tokens}")
    machine = platform.processor() or platform.machine()
    if args.device == "cuda":
        import torch

        machine = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    print(f"machine: {machine}; device {args.device}, dtype {dtype}, cuda graphs "
          f"{args.device == 'cuda' and not args.enforce_eager}, async scheduling {not args.no_async_scheduling}")
    result: dict[str, Any] = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    rounds = [measure_round(args, cfg, model_dir, work, dtype, i) for i in range(args.repeat)]
    result.update(rounds[-1])
    if args.repeat > 1:
        result["rounds"] = rounds
        if "ratio" in rounds[0]:
            result["ratio"] = statistics.median(r["ratio"] for r in rounds)
            each = ", ".join(f"{r['ratio']:.2f}x" for r in rounds)
            print(f"ratio over {args.repeat} rounds: median {result['ratio']:.2f}x ({each})")
    if args.rate > 0:
        result["latency"] = asyncio.run(run_latency(cfg, work, args.rate))
        lat = result["latency"]
        print(f"latency @ {args.rate}/s: TTFT p50 {lat['ttft_p50_ms']:.0f} ms p99 {lat['ttft_p99_ms']:.0f} ms; "
              f"ITL p50 {lat['itl_p50_ms']:.0f} ms p99 {lat['itl_p99_ms']:.0f} ms")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
