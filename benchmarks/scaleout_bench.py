"""Scale-out: the same workload at TP=1, TP=2, PP=2 and DP=2, and where each step's time goes.

The model is SmolLM2-shaped (30 layers, hidden 576, MLP 1536, vocab 49152, SmolLM2's own
tokenizer) with random weights and 8 heads / 4 KV heads, since SmolLM2's 9 heads cannot be
split over TP=2; its step costs the same FLOPs as SmolLM2's.

For every layout the engine runs with `SHARDLINE_PROFILE_DIR` set, so each worker records the
seconds it spends in whole steps, in tensor-parallel collectives (gloo/NCCL all-reduce and
all-gather, including waiting for the slower peer) and in pipeline sends/receives. The engine
side gives the wall time per step; what a step costs beyond the slowest worker's own step time
is the engine's share: scheduling, message encode/decode, the transport both ways and output
processing.

`--tp-allreduce auto|shm|gloo` sets `SHARDLINE_TP_ALLREDUCE` for the workers: what carries the
TP collectives (shared memory between local CPU ranks, or gloo; unset, the workers' default).

    python benchmarks/scaleout_bench.py [--num-requests 16] [--max-tokens 32] [--tp-allreduce shm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from throughput import make_workload  # noqa: E402

LAYOUTS = {
    "TP=1": dict(tensor_parallel_size=1),
    "TP=2": dict(tensor_parallel_size=2),
    "PP=2": dict(pipeline_parallel_size=2),
    "DP=2": dict(data_parallel_size=2),
}


async def run_layout(model_dir: str, layout: dict[str, int], prompts: list[list[int]], max_tokens: int,
                     transport: str) -> dict[str, Any]:
    from shardline.engine import Engine, EngineConfig, SamplingParams

    cfg = EngineConfig(model=model_dir, transport=transport, max_model_len=512, **layout)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async with await Engine.start(cfg) as engine:
        async for _ in engine.generate(prompts[0], SamplingParams(max_tokens=2, temperature=0.0)):
            pass
        steps_before = engine.stats().num_steps
        tokens = 0

        async def one(prompt: list[int]) -> None:
            nonlocal tokens
            async for out in engine.generate(prompt, params):
                if out.finished:
                    tokens += out.num_output_tokens

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - start
        steps = engine.stats().num_steps - steps_before
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed, "steps": steps,
            "replicas": layout.get("data_parallel_size", 1)}


def smollm2_shaped_model(directory: pathlib.Path, smollm2_dir: pathlib.Path) -> pathlib.Path:
    """Write a random-weight Llama of SmolLM2's size whose heads divide by 2 (cached)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    if (directory / "model.safetensors").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    from transformers import AutoConfig

    from model_bench import hf_source

    folder, extra = hf_source(smollm2_dir)  # the default model is its GGUF: transformers' config of it
    config = AutoConfig.from_pretrained(folder, **extra).to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    config.update(num_attention_heads=8, num_key_value_heads=4, head_dim=72)
    hidden, inter, vocab, layers = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    weights = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": rand(576, hidden), p + "self_attn.k_proj.weight": rand(288, hidden),
            p + "self_attn.v_proj.weight": rand(288, hidden), p + "self_attn.o_proj.weight": rand(hidden, 576),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
        })  # fmt: skip
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, directory / name)
    return directory


def read_profiles(directory: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("rank*.json"))]


def summarize(name: str, run: dict[str, Any], profiles: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step milliseconds: engine wall, slowest worker step, collectives, pipeline p2p."""
    steps_per_replica = max(1, run["steps"] // run["replicas"])
    wall_ms = run["seconds"] / steps_per_replica * 1e3
    def per_step(p: dict[str, Any], key: str) -> float:
        return p["seconds"].get(key, 0.0) / max(1, p["counts"].get("step", 1)) * 1e3
    worker_ms = max((per_step(p, "step") for p in profiles), default=0.0)
    coll_ms = max((per_step(p, "tp_collectives") for p in profiles), default=0.0)
    p2p_ms = max((per_step(p, "pp_p2p") for p in profiles), default=0.0)
    engine_ms = max(0.0, wall_ms - worker_ms)
    return {
        "layout": name, **run, "step_wall_ms": wall_ms, "worker_step_ms": worker_ms,
        "collectives_ms": coll_ms, "pp_p2p_ms": p2p_ms, "engine_and_transport_ms": engine_ms,
        "communication_share": (coll_ms + p2p_ms + engine_ms) / wall_ms if wall_ms else 0.0,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--transport", default="shm")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--out", default="benchmarks/out/scaleout.json")
    parser.add_argument("--tp-allreduce", choices=("auto", "shm", "gloo"), default=None,
                        help="SHARDLINE_TP_ALLREDUCE for the workers (default: as inherited)")
    args = parser.parse_args(argv)
    if args.tp_allreduce:
        os.environ["SHARDLINE_TP_ALLREDUCE"] = args.tp_allreduce  # inherited by the workers
    tp_allreduce = os.environ.get("SHARDLINE_TP_ALLREDUCE", "auto")

    from transformers import AutoTokenizer

    from shardline.model.fetch import resolve_model_path

    smollm2 = resolve_model_path(args.model)
    model_dir = str(smollm2_shaped_model(pathlib.Path("benchmarks/out/smollm2-shaped-8h"), smollm2))
    work = make_workload(AutoTokenizer.from_pretrained(model_dir), args.num_requests)
    rows = []
    for name in args.layouts.split(","):
        with tempfile.TemporaryDirectory(prefix="shardline-profile-") as tmp:
            os.environ["SHARDLINE_PROFILE_DIR"] = tmp  # inherited by the spawned workers
            try:
                run = asyncio.run(run_layout(model_dir, LAYOUTS[name], work.prompts, args.max_tokens, args.transport))
            finally:
                del os.environ["SHARDLINE_PROFILE_DIR"]
            rows.append(summarize(name, run, read_profiles(pathlib.Path(tmp))))
    base = rows[0]["tokens_per_s"]
    print(f"{args.num_requests} requests x {args.max_tokens} tokens, SmolLM2-shaped, {args.transport}, "
          f"TP collectives {tp_allreduce}, {os.cpu_count()} cores ({platform.machine()})")
    print(f"{'layout':6} {'tok/s':>7} {'vs TP=1':>8} {'step ms':>8} {'worker':>7} {'collect':>8} {'pp p2p':>7} {'engine+transport':>17} {'comm share':>10}")
    for r in rows:
        print(f"{r['layout']:6} {r['tokens_per_s']:7.1f} {r['tokens_per_s'] / base:7.2f}x {r['step_wall_ms']:8.1f} "
              f"{r['worker_step_ms']:7.1f} {r['collectives_ms']:8.1f} {r['pp_p2p_ms']:7.1f} "
              f"{r['engine_and_transport_ms']:17.1f} {r['communication_share'] * 100:9.0f}%")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "tp_allreduce": tp_allreduce,
                               "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
