"""Forward time per step of the model layer vs transformers vs the machine's GEMM floor.

Shapes (SmolLM2-135M-Instruct, float32, one process):
* decode steps of 1, 8, 32 and 64 sequences, one new token each, every sequence with a
  `--context` token history in the paged KV cache (transformers: a DynamicCache of the same
  length, cropped back after each step so every timed step has the same shape);
* a 512-token prefill of one sequence (logits for the last token only, on both sides).

The floor is the step's FLOPs (2 x multiply-adds of every linear layer and the attention
score/value products, plus the LM head for the tokens that need logits) divided by the
float32 matmul rate measured on this machine with a large square GEMM. The weight-read floor
is the weight bytes one step streams divided by the measured copy bandwidth: each packed
layer's packed weight (integer blocks or float32 panels; its float32 copy is not read), every
float32 weight still read in full (norms, biases, an unpacked LM head), and one embedding row
per token (a lookup reads only its tokens' rows), as `step_weight_bytes` counts them.

    python benchmarks/model_bench.py [--context 128] [--iters 10] [--threads 1] [--markdown PATH]

Prints a table and writes JSON to benchmarks/out/model_bench.json.

`--cpu-ablation` times decode x8/x32/x64 steps and a prefill of 57 x 36-token prompts with
the worker's CPU paths switched on one at a time (decode-attention kernel, fused element-wise
ops, oneDNN-prepacked weights), alternating; JSON goes to benchmarks/out/cpu_ablation.json.
Run it with the worker's thread count and wait policy, e.g.
`OMP_WAIT_POLICY=PASSIVE python benchmarks/model_bench.py --cpu-ablation --threads 2 --context 100`.

`--attention-kernel` times, instead, CPU decode attention both ways in one process, alternating:
the fused paged kernel (`model.paged_decode`) against gather + SDPA, for decode x8/x32/x64 at
contexts 128 and 512: one layer's decode attention call (K/V random, SmolLM2's 9 query / 3 KV
heads of 64) and the whole decode step (30 layers and the logits). JSON goes to
benchmarks/out/attention_kernel.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from shardline.model import paged_decode
from shardline.model.attention import Attention, AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.fetch import fetch_default_model
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext

BLOCK_SIZE = 16
DECODE_BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 512


def timed_pair(first: Callable[[], Any], second: Callable[[], Any], iters: int,
               warmup: int = 2) -> tuple[float, float]:
    """Median seconds of each, run alternately so background load hits both alike."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(iters):
        a.append(_once(first))
        b.append(_once(second))
    return statistics.median(a), statistics.median(b)


def memory_bandwidth(megabytes: int = 256, iters: int = 5) -> float:
    """Measured bytes/s moved by a large tensor copy (read + write counted)."""
    src = torch.randn(megabytes << 18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_once(lambda: dst.copy_(src)) for _ in range(iters))
    return 2 * src.numel() * src.element_size() / best


def gemm_rate(size: int = 2048, iters: int = 5) -> float:
    """Measured float32 matmul FLOP/s (best of `iters` square GEMMs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_once(lambda: torch.mm(a, b)) for _ in range(iters))
    return 2 * size**3 / best


def _once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(cfg: Any, num_tokens: int, context: int, num_logits: int, causal_prefill: bool) -> float:
    """FLOPs of one forward step (linear layers, attention products, LM head)."""
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    per_token_linear = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    per_token_linear += 3 * hidden * inter
    linear = 2 * per_token_linear * num_tokens * layers
    # q.k and p.v: 2 products x 2 flops x heads x head_dim per attended key
    if causal_prefill:
        attended = num_tokens * (num_tokens + 1) / 2
    else:
        attended = num_tokens * (context + 1)
    attention = 4 * heads * head_dim * attended * layers
    return linear + attention + 2 * hidden * cfg.vocab_size * num_logits


def step_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """What one step reads of the model's weights: `packed` (every layer's packed weight, read
    instead of its float32 weight), `float32` (every other parameter read in full: norms,
    biases, an unpacked LM head; a tied weight once) and `embedding_row` (bytes of one row of an
    embedding table, read once per token: a lookup does not stream the table)."""
    from shardline.model.parallel.embedding import ParallelLMHead, VocabParallelEmbedding

    packed = float32 = row = 0
    counted: set[int] = set()
    for module in model.modules():
        packed_weight = getattr(module, "packed_weight", None)
        if isinstance(packed_weight, torch.Tensor):
            packed += packed_weight.numel() * packed_weight.element_size()
        lookup = isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and lookup:
                row += param.shape[-1] * param.element_size()
                continue
            if (name == "weight" and isinstance(packed_weight, torch.Tensor)) or param.is_meta \
                    or id(param) in counted:
                continue
            counted.add(id(param))
            float32 += param.numel() * param.element_size()
    return {"packed": packed, "float32": float32, "embedding_row": row}


class Ours:
    """The model as a CPU worker sets it up: panel-packed weights and a populated huge-page KV
    cache (`main` also applies the worker's heap policy; the OpenMP wait policy is the caller's)."""

    def __init__(self, path: pathlib.Path, max_tokens: int) -> None:
        from shardline.model.packed_linear import pack_linear_weights
        from shardline.worker.kv_cache import allocate_kv_cache

        self.config = ModelConfig.from_path(path)
        self.model = load_model(self.config, ParallelContext.single())
        pack_linear_weights(self.model)
        self.num_blocks = max_tokens // BLOCK_SIZE + 8
        allocate_kv_cache(self.model, self.num_blocks, block_size=BLOCK_SIZE, dtype=torch.float32,
                          device=torch.device("cpu"))

    @staticmethod
    def decode_tables(batch: int, context: int) -> list[list[int]]:
        blocks_each = -(-(context + 1) // BLOCK_SIZE)
        return [[1 + i * blocks_each + j for j in range(blocks_each)] for i in range(batch)]

    def prepare_decode(self, batch: int, context: int, fill: bool = True) -> Callable[[], Any]:
        """A decode step of `batch` sequences after `context` tokens; `fill=False` leaves the
        cache as it is (the prompts' prefill is skipped: the step's time does not depend on it)."""
        tables = self.decode_tables(batch, context)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, self.config.hf_config.vocab_size, (batch, context), generator=gen)
        with torch.inference_mode():
            for i in range(batch if fill else 0):  # fill the cache
                attn = AttentionMetadata.build(query_lens=[context], context_lens=[0],
                                               block_tables=[tables[i]], block_size=BLOCK_SIZE)
                self.model(prompt[i], torch.arange(context), attn)
        attn = AttentionMetadata.build(query_lens=[1] * batch, context_lens=[context] * batch,
                                       block_tables=tables, block_size=BLOCK_SIZE)
        ids = prompt[:, -1].clone()
        positions = torch.full((batch,), context)

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return self.model.compute_logits(self.model(ids, positions, attn))

        return step

    def prepare_prefill(self, tokens: int) -> Callable[[], Any]:
        table = list(range(1, -(-tokens // BLOCK_SIZE) + 1))
        attn = AttentionMetadata.build(query_lens=[tokens], context_lens=[0], block_tables=[table],
                                       block_size=BLOCK_SIZE)
        ids = torch.randint(0, self.config.hf_config.vocab_size, (tokens,),
                            generator=torch.Generator().manual_seed(1))

        def step() -> torch.Tensor:
            with torch.inference_mode():
                hidden = self.model(ids, torch.arange(tokens), attn)
                return self.model.compute_logits(hidden[-1:])

        return step


    def prepare_prefills(self, num: int, tokens: int) -> Callable[[], Any]:
        """A step of `num` fresh prompts of `tokens` tokens each (logits for each last token)."""
        blocks_each = -(-tokens // BLOCK_SIZE)
        tables = [[1 + i * blocks_each + j for j in range(blocks_each)] for i in range(num)]
        attn = AttentionMetadata.build(query_lens=[tokens] * num, context_lens=[0] * num,
                                       block_tables=tables, block_size=BLOCK_SIZE)
        ids = torch.randint(0, self.config.hf_config.vocab_size, (num * tokens,),
                            generator=torch.Generator().manual_seed(2))
        positions = torch.arange(tokens).repeat(num)
        last = torch.arange(1, num + 1) * tokens - 1

        def step() -> torch.Tensor:
            with torch.inference_mode():
                attn.derived.clear()
                return self.model.compute_logits(self.model(ids, positions, attn)[last])

        return step


def hf_source(path: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """transformers' `from_pretrained` arguments for a shardline model path (a GGUF loads from
    the GGUF: the default model's cache holds no config.json)."""
    from shardline.model.gguf_reader import transformers_source

    return transformers_source(path)


class Transformers:
    def __init__(self, path: pathlib.Path) -> None:
        from transformers import AutoModelForCausalLM

        folder, extra = hf_source(path)
        self.model = AutoModelForCausalLM.from_pretrained(folder, **extra, dtype=torch.float32).eval()
        self.vocab = self.model.config.vocab_size

    def prepare_decode(self, batch: int, context: int) -> Callable[[], Any]:
        from transformers import DynamicCache

        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, self.vocab, (batch, context), generator=gen)
        cache = DynamicCache(config=self.model.config)
        # transformers renamed `past_key_values` to `cache` (the old name warns, then goes).
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.inference_mode():
            self.model(prompt, use_cache=True, logits_to_keep=1, **{name: cache})
        ids = prompt[:, -1:].clone()
        positions = torch.full((batch, 1), context)

        def step() -> torch.Tensor:
            with torch.inference_mode():
                out = self.model(ids, position_ids=positions, use_cache=True, **{name: cache})
                cache.crop(-1)  # drop the appended token: every step has the same shape
                return out.logits

        return step

    def prepare_prefill(self, tokens: int) -> Callable[[], Any]:
        ids = torch.randint(0, self.vocab, (1, tokens), generator=torch.Generator().manual_seed(1))

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return self.model(ids, use_cache=False, logits_to_keep=1).logits

        return step


def in_mode(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with SHARDLINE_CPU_ATTENTION=`mode` (read by every decode attention call)."""
    def run() -> Any:
        os.environ[paged_decode.MODE_ENV] = mode
        return fn()

    return run


def attention_kernel_rows(path: pathlib.Path, iters: int, contexts: tuple[int, ...] = (128, 512),
                          batches: tuple[int, ...] = (8, 32, 64), calls: int = 10) -> list[dict]:
    """Decode attention (one layer, `calls` calls per sample) and whole decode steps, fused
    kernel vs gather + SDPA, alternating in this process."""
    if not paged_decode.KERNEL.load():
        raise SystemExit(f"the kernel could not be built: {paged_decode.KERNEL.error}")
    ours = Ours(path, max(batches) * (max(contexts) + 2 * BLOCK_SIZE))
    layers = [m for m in ours.model.modules() if isinstance(m, Attention)]
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        layer.kv_cache.normal_(generator=gen)
    layer = layers[0]
    rows = []
    for context in contexts:
        for batch in batches:
            attn = AttentionMetadata.build(
                query_lens=[1] * batch, context_lens=[context] * batch,
                block_tables=Ours.decode_tables(batch, context), block_size=BLOCK_SIZE)
            query = torch.randn(batch, layer.num_heads, layer.head_dim, generator=gen)
            out = torch.empty_like(query)

            def attend(q: torch.Tensor = query, o: torch.Tensor = out,
                       a: AttentionMetadata = attn) -> None:
                for _ in range(calls):
                    layer._attend_decode(q, o, a, None)

            attn_kernel_s, attn_sdpa_s = timed_pair(in_mode("kernel", attend),
                                                    in_mode("sdpa", attend), iters)
            step = ours.prepare_decode(batch, context, fill=False)
            step_kernel, step_sdpa = in_mode("kernel", step), in_mode("sdpa", step)
            want = step_sdpa()
            logit_diff = ((step_kernel() - want).abs().max() / want.abs().max()).item()
            kernel_s, sdpa_s = timed_pair(step_kernel, step_sdpa, iters)
            rows.append({"batch": batch, "context": context,
                         "attention_kernel_us": attn_kernel_s / calls * 1e6,
                         "attention_sdpa_us": attn_sdpa_s / calls * 1e6,
                         "step_kernel_ms": kernel_s * 1e3, "step_sdpa_ms": sdpa_s * 1e3,
                         "max_logit_rel_diff": logit_diff})
            print(rows[-1], flush=True)
    os.environ.pop(paged_decode.MODE_ENV, None)
    return rows


def attention_kernel_table(rows: list[dict]) -> str:
    lines = ["| decode | context | attention µs/layer: kernel | gather+SDPA | speed-up "
             "| step ms: kernel | gather+SDPA | speed-up | max logit diff (rel.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [
        f"| x{r['batch']} | {r['context']} | {r['attention_kernel_us']:.0f} | "
        f"{r['attention_sdpa_us']:.0f} | {r['attention_sdpa_us'] / r['attention_kernel_us']:.2f}x | "
        f"{r['step_kernel_ms']:.1f} | {r['step_sdpa_ms']:.1f} | "
        f"{r['step_sdpa_ms'] / r['step_kernel_ms']:.2f}x | {r['max_logit_rel_diff']:.1e} |"
        for r in rows
    ]
    return "\n".join(lines)


# Each CPU path of the worker switched on in turn (model.paged_decode, model.cpu_ops,
# model.packed_linear), cumulatively: (label, attention mode, fused ops, packed weights).
CPU_ABLATION = (
    ("torch ops (SDPA attention, plain GEMMs)", "sdpa", "off", False),
    ("+ fused decode-attention kernel", "kernel", "off", False),
    ("+ fused element-wise ops", "kernel", "auto", False),
    ("+ panel-packed weights, own GEMM kernel (all on)", "kernel", "auto", True),
)


def cpu_ablation_rows(path: pathlib.Path, iters: int, context: int) -> list[dict]:
    """Decode x8/x32/x64 steps and the standard workload's first prefill step (57 prompts of 36
    tokens) under each CPU_ABLATION configuration, alternating configurations every iteration
    so machine noise hits all alike; median ms of each."""
    ours = Ours(path, 64 * (context + 2 * BLOCK_SIZE) + 57 * 48)
    layers = [m for m in ours.model.modules() if getattr(m, "packed_weight", None) is not None]
    packed = [m.packed_weight for m in layers]
    steps = {f"decode x{b} (ctx {context})": ours.prepare_decode(b, context, fill=False)
             for b in (8, 32, 64)}
    steps["prefill 57 x 36 tokens"] = ours.prepare_prefills(57, 36)

    def configure(attention: str, fused: str, use_packed: bool) -> None:
        os.environ[paged_decode.MODE_ENV] = attention
        os.environ["SHARDLINE_CPU_FUSED_OPS"] = fused
        for layer, weight in zip(layers, packed, strict=True):
            layer.packed_weight = weight if use_packed else None

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(iters + 1):  # the first round warms up
        for label, *config in CPU_ABLATION:
            configure(*config)
            for name, step in steps.items():
                times.setdefault((label, name), []).append(_once(step))
    configure("auto", "auto", True)
    os.environ.pop(paged_decode.MODE_ENV, None)
    os.environ.pop("SHARDLINE_CPU_FUSED_OPS", None)
    return [{"config": label, "shape": name, "ms": statistics.median(samples[1:]) * 1e3}
            for (label, name), samples in times.items()]


def cpu_ablation_table(rows: list[dict]) -> str:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    ms = {(r["config"], r["shape"]): r["ms"] for r in rows}
    lines = ["| CPU path | " + " | ".join(f"{s} ms" for s in shapes) + " |",
             "|---|" + "---:|" * len(shapes)]
    for config in configs:
        cells = [f"{ms[(config, s)]:.1f} ({ms[(configs[0], s)] / ms[(config, s)]:.2f}x)" for s in shapes]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128, help="cached tokens per decode sequence")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a shared 2-core box, "
                             "multi-threaded GEMMs stall on busy cores)")
    parser.add_argument("--attention-kernel", action="store_true",
                        help="time CPU decode attention, fused kernel vs gather + SDPA, instead")
    parser.add_argument("--cpu-ablation", action="store_true",
                        help="time decode and prefill steps with each CPU path switched on in turn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from shardline.worker.heap import retain_freed_memory

    retain_freed_memory()  # the worker's heap policy (both sides gain: no per-step page faults)

    path = fetch_default_model()
    out_dir = pathlib.Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    if args.cpu_ablation:
        ablation = cpu_ablation_rows(path, args.iters, args.context)
        table = cpu_ablation_table(ablation)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
        print(table)
        (out_dir / "cpu_ablation.json").write_text(json.dumps(
            {"torch": torch.__version__, "threads": torch.get_num_threads(),
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": ablation}, indent=2))
        if args.markdown:
            args.markdown.write_text(f"{table}\n")
        return
    if args.attention_kernel:
        kernel_rows = attention_kernel_rows(path, args.iters)
        kernel_table = attention_kernel_table(kernel_rows)
        print(kernel_table)
        (out_dir / "attention_kernel.json").write_text(json.dumps(
            {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": kernel_rows},
            indent=2))
        if args.markdown:
            args.markdown.write_text(f"{kernel_table}\n")
        return
    rate = gemm_rate()
    bandwidth = memory_bandwidth()
    max_tokens = max(max(DECODE_BATCHES) * (args.context + BLOCK_SIZE), PREFILL_TOKENS + BLOCK_SIZE)
    ours, theirs = Ours(path, max_tokens), Transformers(path)
    cfg = ours.config.hf_config
    read = step_weight_bytes(ours.model)
    weight_bytes = read["packed"] + read["float32"]  # every step streams these once
    shapes: list[tuple[str, Callable[[Any], Callable[[], Any]], float, int]] = []
    for batch in DECODE_BATCHES:
        shapes.append((f"decode x{batch} (ctx {args.context})",
                       lambda m, b=batch: m.prepare_decode(b, args.context),
                       step_flops(cfg, batch, args.context, batch, causal_prefill=False), batch))
    shapes.append((f"prefill {PREFILL_TOKENS}", lambda m: m.prepare_prefill(PREFILL_TOKENS),
                   step_flops(cfg, PREFILL_TOKENS, 0, 1, causal_prefill=True), PREFILL_TOKENS))

    rows = []
    for name, prepare, flops, tokens in shapes:
        ours_s, theirs_s = timed_pair(prepare(ours), prepare(theirs), args.iters)
        floor_s = flops / rate
        memory_floor_s = (weight_bytes + tokens * read["embedding_row"]) / bandwidth
        rows.append({"shape": name, "shardline_ms": ours_s * 1e3, "transformers_ms": theirs_s * 1e3,
                     "speedup_vs_transformers": theirs_s / ours_s, "gemm_floor_ms": floor_s * 1e3,
                     "shardline_over_gemm_floor": ours_s / floor_s,
                     "memory_floor_ms": memory_floor_s * 1e3,
                     "shardline_over_roofline": ours_s / max(floor_s, memory_floor_s),
                     "gflop": flops / 1e9})

    header = ("| shape | shardline ms | transformers ms | speed-up | GEMM floor ms | x GEMM floor "
              "| weight-read floor ms | x max(floors) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['shape']} | {r['shardline_ms']:.1f} | {r['transformers_ms']:.1f} | "
        f"{r['speedup_vs_transformers']:.2f}x | {r['gemm_floor_ms']:.2f} | "
        f"{r['shardline_over_gemm_floor']:.1f} | {r['memory_floor_ms']:.1f} | "
        f"{r['shardline_over_roofline']:.1f} |"
        for r in rows
    ]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
               f"measured float32 GEMM rate {rate / 1e9:.1f} GFLOP/s, copy bandwidth "
               f"{bandwidth / 1e9:.1f} GB/s, weights read per step {weight_bytes / 1e6:.0f} MB "
               f"(packed {read['packed'] / 1e6:.0f} MB + float32 {read['float32'] / 1e6:.1f} MB, "
               f"plus {read['embedding_row']} B of embedding per token)")
    table = "\n".join(lines)
    print(machine)
    print(table)
    (out_dir / "model_bench.json").write_text(json.dumps(
        {"machine": machine, "gemm_flops_per_s": rate, "copy_bytes_per_s": bandwidth,
         "weight_read_bytes": read, "context": args.context, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.write_text(f"{machine}\n\n{table}\n")


if __name__ == "__main__":
    main()
