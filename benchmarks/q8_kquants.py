"""The int8-activation GEMM's GGUF K-quant forms: at about the file's size against float32 scales (issue 23).

`SHARDLINE_CPU_ACTIVATIONS=int8` packs Q4_K / Q5_K / Q6_K weights with the file's integer
sub-block scales and Q6_K / Q5_K's high bits as bit planes, each part of a fused weight in its
own form (`Q8Weight.from_gguf`, "after"); before, they took float32 d and m per block of 32 and
one common form per fused weight (`Q8Weight.pack` of `packed_linear._weight_scaled_blocks`,
"before", still the fallback). Both run in one process on the same random blocks
(tests/support/gguf_models.py's `quantized_bytes`), alternating, `--rounds` times:

* bytes per weight of each type's form (an 8192 x 2048 weight), and of a Q4_K_M file's fused qkv
  whose v is Q6_K;
* a Llama-3.2-1B-shaped stack of 16 layers (qkv, o, gate_up, down; Q6_K attn_v and ffn_down in
  the layers llama.cpp's Q4_K_M gives more bits, as benchmarks/gguf_quant.py's file), and with
  `--head` its 128,256 x 2,048 Q6_K LM head: ms for one pass of the stack by `--rows` rows,
  medians of several passes per round, then the median (and the fastest) of the rounds; "after" both with each
  weight in its own allocation and in one huge-page buffer, as the worker packs them.

`--smollm2` also times the default model's shapes (30 layers, Q4_1-like nibbles with float16
scales) with each weight in its own allocation and in one `Q8Arena`, as the worker now packs
int8 weights of every form. `--model` also writes gguf_quant.py's synthetic 1B file and loads it as a worker does
(`load_packed_model`, int8 mode) in a fresh process per variant: the weight bytes the start-up
log states, the int8 layers, and the process's peak RSS after loading; with `--engine`, one
stream's decode speed on it (an in-process engine, float16 KV cache, 64 greedy tokens after a
32-token prompt, 3 timed requests after a warm-up, in a fresh process per variant, alternating;
"before" the old forms in their own allocations).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import textwrap
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from startup import _python_child  # noqa: E402

HIDDEN, LAYERS, INTER, VOCAB = 2048, 16, 8192, 128256
Q_ROWS, KV_ROWS = 2048, 512  # 32 heads, 8 kv heads of 64


def more_bits(layer: int) -> bool:
    """llama.cpp's use_more_bits (gguf_quant.py's)."""
    return layer < LAYERS // 8 or layer >= 7 * LAYERS // 8 or (layer - LAYERS // 8) % 3 == 2


def random_part(type_name: str, rows: int, cols: int, seed: int) -> Any:
    import numpy as np
    import torch

    from shardline.model.gguf_weights import TYPES, GGUFTensor
    from support.gguf_models import quantized_bytes

    rng = np.random.default_rng(seed)
    raw = quantized_bytes(np.broadcast_to(np.float32(0), (rows, cols)), type_name, rng)
    return GGUFTensor("w", TYPES[type_name][0], (rows, cols), torch.from_numpy(np.ascontiguousarray(raw)))


def forms(weight: Any) -> tuple[Any, Any]:
    """(before, after) int8 forms of a GGUF linear weight."""
    from shardline.model import packed_linear
    from shardline.model.q8_linear import Q8Weight

    scaled = packed_linear._weight_scaled_blocks(weight)
    assert scaled is not None
    d, d2, m, q = scaled
    before = Q8Weight.pack(d, m, q, d2)
    after = Q8Weight.from_gguf(weight.out_features, weight.in_features,
                               [(f, p.type, p.data) for f, p in weight.parts])
    assert after is not None
    return before, after


def bytes_per_weight() -> dict[str, float]:
    from shardline.model.gguf_weights import GGUFLinearWeight

    out = {}
    for name in ("Q4_K", "Q5_K", "Q6_K"):
        part = random_part(name, 8192, 2048, seed=1)
        before, after = forms(GGUFLinearWeight(8192, 2048, [(0, part)]))
        out[f"{name} file"] = part.nbytes / (8192 * 2048)
        out[f"{name} before"] = before.nbytes / (8192 * 2048)
        out[f"{name} after"] = after.nbytes / (8192 * 2048)
    parts = [(0, random_part("Q4_K", Q_ROWS, HIDDEN, 2)), (Q_ROWS, random_part("Q4_K", KV_ROWS, HIDDEN, 3)),
             (Q_ROWS + KV_ROWS, random_part("Q6_K", KV_ROWS, HIDDEN, 4))]
    rows = Q_ROWS + 2 * KV_ROWS
    before, after = forms(GGUFLinearWeight(rows, HIDDEN, parts))
    out["qkv Q4_K+Q6_K file"] = sum(p.nbytes for _, p in parts) / (rows * HIDDEN)
    out["qkv Q4_K+Q6_K before"] = before.nbytes / (rows * HIDDEN)
    out["qkv Q4_K+Q6_K after"] = after.nbytes / (rows * HIDDEN)
    return out


def stack(head: bool) -> tuple[list[Any], list[Any], list[Any]]:
    """The 1B stack's weights: before, after (each weight its own allocation) and after as the
    worker packs them (`q8_linear.Q8Arena`: one huge-page buffer). Blocks are shared
    between layers of the same types; every layer's packed copy is its own."""
    from shardline.model.gguf_weights import GGUFLinearWeight
    from shardline.model.q8_linear import Q8Arena, Q8Weight

    cache: dict[tuple[str, int, int], Any] = {}

    def part(name: str, rows: int, cols: int) -> Any:
        key = (name, rows, cols)
        if key not in cache:
            cache[key] = random_part(name, rows, cols, seed=len(cache))
        return cache[key]

    before, after, gguf = [], [], []
    for layer in range(LAYERS):
        big = "Q6_K" if more_bits(layer) else "Q4_K"
        weights = [
            GGUFLinearWeight(Q_ROWS + 2 * KV_ROWS, HIDDEN, [(0, part("Q4_K", Q_ROWS, HIDDEN)),
                             (Q_ROWS, part("Q4_K", KV_ROWS, HIDDEN)), (Q_ROWS + KV_ROWS, part(big, KV_ROWS, HIDDEN))]),
            GGUFLinearWeight(HIDDEN, HIDDEN, [(0, part("Q4_K", HIDDEN, HIDDEN))]),
            GGUFLinearWeight(2 * INTER, HIDDEN, [(0, part("Q4_K", INTER, HIDDEN)), (INTER, part("Q4_K", INTER, HIDDEN))]),
            GGUFLinearWeight(HIDDEN, INTER, [(0, part(big, HIDDEN, INTER))]),
        ]
        gguf += weights
    if head:
        gguf.append(GGUFLinearWeight(VOCAB, HIDDEN, [(0, part("Q6_K", VOCAB, HIDDEN))]))
    for weight in gguf:
        b, a = forms(weight)
        before.append(b)
        after.append(a)
    layouts = [Q8Weight.gguf_layout(w.out_features, w.in_features, [(f, p.type, p.shape[0]) for f, p in w.parts])
               for w in gguf]
    arena = Q8Arena(sum(Q8Arena.bound_of(w.out_features, w.in_features, t) for w, t in zip(gguf, layouts, strict=True)))
    huge = [arena.from_gguf(w.out_features, w.in_features, [(f, p.type, p.data) for f, p in w.parts], t)
            for w, t in zip(gguf, layouts, strict=True) if t is not None]
    return before, after, huge


def smollm2_stack() -> tuple[list[Any], list[Any]]:
    """SmolLM2-135M's 30 layers (the default model's shapes) of Q4_1-like blocks (q 0..15, float16
    d and m: nibbles with float16 scales), each weight in its own allocation (as before) and in
    one `Q8Arena` (as the worker packs them now)."""
    import torch

    from shardline.model.q8_linear import Q8Arena, Q8Weight

    gen = torch.Generator().manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30
    blocks = []
    for n, k in shapes:
        q = torch.randint(0, 16, (n, k), dtype=torch.int8, generator=gen)
        d = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
        blocks.append((d, -(torch.rand(n, k // 32, generator=gen) * 0.01).half().float(), q))
    arena = Q8Arena(sum(Q8Arena.bound_of(n, k) for n, k in shapes))
    return [Q8Weight.pack(*b) for b in blocks], [arena.pack(*b) for b in blocks]


def time_stack(weights: list[Any], rows: int) -> float:
    """Median ms of passes over the stack (each weight on its own input of `rows` rows)."""
    import torch

    inputs = {w.in_features: torch.randn(rows, w.in_features) for w in weights}

    def one() -> None:
        for w in weights:
            w.matmul(inputs[w.in_features], None)

    one()
    times = []
    for _ in range(7 if rows <= 16 else 3):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


MODEL_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    os.environ["SHARDLINE_CPU_ACTIVATIONS"] = "int8"
    os.environ["SHARDLINE_PACKED_CACHE"] = "off"
    import torch
    from shardline.model import packed_linear
    from shardline.model.config import ModelConfig
    from shardline.model.parallel_context import ParallelContext
    from shardline.model.q8_linear import Q8Weight
    if sys.argv[2] == "before":  # the form every K-quant weight took before: float32 scales
        Q8Weight.gguf_layout = staticmethod(lambda *a: None)
    torch.set_num_threads(2)
    model, info = packed_linear.load_packed_model(ModelConfig.from_path(sys.argv[1]), ParallelContext.single())
    weights = [w for m in model.modules() if isinstance(w := getattr(m, "packed_weight", None), Q8Weight)]
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    print(json.dumps({"int8 weight MiB": sum(w.nbytes for w in weights) / 2**20, "int8 layers": info["int8_layers"],
                      "packed MiB (start-up log)": info["packed"] / 2**20,
                      "peak RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "RSS after load MiB": rss}))
""")


ENGINE_CHILD = textwrap.dedent("""
    import asyncio, json, os, statistics, sys, time
    os.environ["SHARDLINE_CPU_ACTIVATIONS"] = "int8"
    os.environ["SHARDLINE_PACKED_CACHE"] = "off"
    from shardline.model import packed_linear
    from shardline.model.q8_linear import Q8Weight
    if sys.argv[2] == "before":  # the old forms, each weight in its own allocation
        Q8Weight.gguf_layout = staticmethod(lambda *a: None)
        class Own:
            def __init__(self, bound): pass
            bound_of = staticmethod(lambda *a: 0)
            pack = staticmethod(Q8Weight.pack)
        packed_linear.Q8Arena = Own
    from shardline.engine import Engine, EngineConfig, SamplingParams

    async def main():
        cfg = EngineConfig(model=sys.argv[1], max_model_len=512, transport="inproc", kv_cache_dtype="float16",
                           log_stats_interval=0)
        rates = []
        async with await Engine.start(cfg) as engine:
            params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
            for rep in range(4):
                first = last = None
                count = 0
                async for out in engine.generate(list(range(300, 332)), params):
                    now = time.perf_counter()
                    if first is None:
                        first, start_count = now, len(out.token_ids)
                    last, count = now, len(out.token_ids)
                if rep:  # the first is a warm-up
                    rates.append((count - start_count) / (last - first))
        print(json.dumps({"single stream tok/s": statistics.median(rates), "rounds": rates}))

    asyncio.run(main())
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--head", action="store_true", help="the Q6_K LM head in the stack too")
    parser.add_argument("--smollm2", action="store_true",
                        help="also a SmolLM2-shaped Q4_1 stack, own allocations against one Q8Arena")
    parser.add_argument("--model", action="store_true", help="load gguf_quant.py's synthetic 1B file, both forms")
    parser.add_argument("--engine", action="store_true",
                        help="with --model: one stream's decode speed on it too (in-process engine)")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from shardline.model import paged_decode

    assert paged_decode.KERNEL.load(), paged_decode.KERNEL.error
    torch.set_num_threads(args.threads)
    per_weight = bytes_per_weight()
    result: dict[str, Any] = {"bytes per weight": per_weight}
    for key, value in per_weight.items():
        print(f"{key:28} {value:.4f} bytes/weight")
    before, after, huge = stack(args.head)
    sizes = {"before": sum(w.nbytes for w in before), "after": sum(w.nbytes for w in after)}
    print(f"stack MB: before {sizes['before'] / 1e6:.0f}, after {sizes['after'] / 1e6:.0f}")
    variants = [("before", before), ("after", after), ("after, huge pages", huge)]
    result["stack MB"] = {k: v / 1e6 for k, v in sizes.items()}
    if args.smollm2:
        own, arena = smollm2_stack()
        variants += [("SmolLM2 Q4_1, own allocations", own), ("SmolLM2 Q4_1, one huge-page buffer", arena)]
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        times: dict[str, float] = {}
        for rows in map(int, args.rows.split(",")):
            for name, weights in (variants if r % 2 == 0 else variants[::-1]):
                times[f"{name} M={rows}"] = time_stack(weights, rows)
        rounds.append(times)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()))
    medians = {key: statistics.median(t[key] for t in rounds) for key in rounds[0]}
    fastest = {key: min(t[key] for t in rounds) for key in rounds[0]}
    result.update(rounds=rounds, medians=medians, fastest=fastest)
    for key, value in medians.items():
        print(f"{key:28} median {value:8.2f} ms, fastest round {fastest[key]:8.2f} ms")
    del before, after, huge, variants
    if args.model:
        from gguf_quant import write_model

        with tempfile.TemporaryDirectory() as tmp:
            path = write_model(pathlib.Path(tmp) / "llama-3.2-1b-q4_k_m-synthetic.gguf", VOCAB)
            loads: dict[str, list[Any]] = {}
            for name in ("before", "after", "before", "after"):
                got = _python_child(MODEL_CHILD, None, str(path), name, timeout=None)
                loads.setdefault(name, []).append(got)
                print(f"model {name}: {got}")
            result["model"] = loads
            if args.engine:
                speeds: dict[str, list[Any]] = {}
                for name in ("before", "after", "before", "after"):
                    got = _python_child(ENGINE_CHILD, None, str(path), name, timeout=None)
                    speeds.setdefault(name, []).append(got)
                    print(f"engine {name}: {got}")
                result["engine"] = speeds
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
