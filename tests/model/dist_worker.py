"""A tensor-parallel worker for the tests, and the paged-cache scenario every test runs.

Run as `python dist_worker.py SPEC.json RANK`: joins a gloo world, applies the registry specs
it was given, loads each model job for its rank, runs `run_scenario` and saves the logits to
`<out_dir>/<job>-rank<RANK>.pt`. The tests also import this file (by path) to run the same
scenario in-process at TP=1.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from shardline.model.attention import Attention, AttentionMetadata

# Three requests; each step schedules {request: tokens}. Request "c" is prefilled in two chunks
# (the second attends over a cached prefix) while "a" and "b" decode: mixed batches throughout.
SCENARIO_LENGTHS = {"a": 27, "b": 13, "c": 17}
SCENARIO_STEPS: list[dict[str, int]] = [
    {"a": 21, "b": 7},
    {"a": 1, "b": 1, "c": 8},
    {"a": 1, "b": 1, "c": 5},
    *[{"a": 1, "b": 1, "c": 1}] * 4,
]


def scenario_tokens(vocab_size: int, seed: int = 1) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, vocab_size, (n,), generator=gen).tolist()
            for name, n in SCENARIO_LENGTHS.items()}


def allocate_kv_cache(model: torch.nn.Module, num_blocks: int, block_size: int,
                      device: str = "cpu") -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.kv_cache = torch.zeros(num_blocks, 2, block_size, module.num_kv_heads,
                                          module.head_dim, device=device)


def run_scenario(model: Any, vocab_size: int, block_size: int = 4, device: str = "cpu",
                 tokens: dict[str, list[int]] | None = None,
                 steps: list[dict[str, int]] | None = None) -> dict[str, torch.Tensor]:
    """Logits of every position of every request, computed through the paged cache in the
    mixed batches of `steps` (default SCENARIO_STEPS over `scenario_tokens`); {request:
    [num_tokens, vocab]}."""
    tokens = tokens or scenario_tokens(vocab_size)
    steps = steps or SCENARIO_STEPS
    blocks_each = max(-(-len(t) // block_size) for t in tokens.values())
    allocate_kv_cache(model, blocks_each * len(tokens) + 1, block_size, device)
    # Interleaved, non-contiguous block ids (block 0 unused, as a padding id would be).
    tables = {name: [1 + i + len(tokens) * j for j in reversed(range(blocks_each))]
              for i, name in enumerate(tokens)}
    done = dict.fromkeys(tokens, 0)
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in tokens}
    with torch.no_grad():
        for step in steps:
            names = list(step)
            ids = [t for n in names for t in tokens[n][done[n]:done[n] + step[n]]]
            positions = [p for n in names for p in range(done[n], done[n] + step[n])]
            attn = AttentionMetadata.build(
                query_lens=[step[n] for n in names], context_lens=[done[n] for n in names],
                block_tables=[tables[n] for n in names], block_size=block_size, device=device,
            )
            hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                           attn)
            out = model.compute_logits(hidden)
            start = 0
            for n in names:
                logits[n].append(out[start:start + step[n]])
                start += step[n]
                done[n] += step[n]
    return {n: torch.cat(parts) for n, parts in logits.items()}


def main(spec_path: str, rank: int) -> None:
    from shardline.model.config import ModelConfig
    from shardline.model.loader import LoadStats, load_model
    from shardline.model.parallel_context import destroy_distributed, init_distributed
    from shardline.model.registry import ModelRegistry

    with open(spec_path) as f:
        spec = json.load(f)
    ctx = init_distributed(rank=rank, world_size=spec["world_size"], tp_size=spec["tp_size"],
                           pp_size=1, dp_rank=0, dp_size=1, init_method=spec["init_method"],
                           backend="gloo", device="cpu", timeout_s=60,
                           enable_expert_parallel=spec.get("enable_expert_parallel", False))
    try:
        ModelRegistry.register_specs(spec.get("registry", {}))
        for job in spec["jobs"]:
            config = ModelConfig.from_path(job["path"], architecture=job.get("architecture"))
            stats = LoadStats()
            model = load_model(config, ctx, stats)
            result: dict[str, Any] = {"bytes_read": stats.bytes_read}
            if job.get("run", True):
                result["logits"] = run_scenario(model, config.hf_config.vocab_size)
            torch.save(result, f"{spec['out_dir']}/{job['name']}-rank{rank}.pt")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
