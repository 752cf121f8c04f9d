"""A bare GGUF of an issue-24 family serves through the engine (issue 24): greedy tokens of
Engine.generate equal transformers' `generate` loading the same file, for a MoE family
(qwen3moe) and one with sliding-window and soft-capped layers (gemma2, window 4 under a 9-token
prompt)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.engine import Engine, EngineConfig, SamplingParams
from support.gguf_arch_models import write_tiny_arch_gguf

PROMPT = [1, 45, 12, 7, 260, 2, 99, 17, 30]
MAX_TOKENS = 8


@pytest.mark.parametrize("arch", ["qwen3moe", "gemma2"])
async def test_greedy_tokens_equal_transformers_on_the_same_file(
    arch: str, tmp_path: pathlib.Path
) -> None:
    from transformers import AutoModelForCausalLM

    path = write_tiny_arch_gguf(tmp_path / "m.gguf", arch, "Q8_0", seed=6)
    extra = {"norm_topk_prob": True} if arch == "qwen3moe" else {}  # see test_gguf_architectures
    ref = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(PROMPT) :].tolist()
    config = EngineConfig(model=str(path), max_model_len=128, num_kv_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    async with await Engine.start(config) as engine:
        outputs = [out async for out in engine.generate(PROMPT, params)]
    assert outputs[-1].token_ids == want
