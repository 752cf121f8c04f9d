"""A prompt long enough that its later prefill chunks take the mask-free split attention
(model/flash_prefix.py, from 4,096 cached tokens on) is scored as transformers scores it, and
its greedy continuation is transformers' too."""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.model import flash_prefix
from support.hf_tiny import hf_greedy
from support.tiny_models import make_tiny_model_dir

PROMPT_TOKENS = 5000  # chunks of 512: the last two see >= 4,096 cached tokens
CHUNK = 512


async def test_long_prompt_logprobs_and_greedy_equal_transformers(tmp_path: pathlib.Path) -> None:
    first_split = (flash_prefix.MIN_CONTEXT + CHUNK - 1) // CHUNK * CHUNK
    assert first_split < PROMPT_TOKENS
    path = make_tiny_model_dir(tmp_path / "tiny", max_position_embeddings=6144, seed=3)
    rng = random.Random(0)
    prompt = [rng.randrange(0, 256) for _ in range(PROMPT_TOKENS)]
    config = EngineConfig(model=str(path), max_model_len=6144, num_kv_blocks=420, block_size=16,
                          max_num_batched_tokens=CHUNK, long_prefill_token_threshold=CHUNK)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    async with await Engine.start(config) as engine:
        outputs = [out async for out in engine.generate(prompt, params)]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    entries = outputs[0].prompt_logprobs
    assert entries is not None and len(entries) == PROMPT_TOKENS
    # Every position of the chunks computed over >= MIN_CONTEXT cached tokens, and a few before.
    for position in range(first_split - 16, PROMPT_TOKENS):
        entry = entries[position]
        assert entry is not None and entry.token_id == prompt[position]
        want = reference[position - 1, prompt[position]].item()
        assert entry.logprob == pytest.approx(want, abs=1e-4), position
    assert outputs[-1].token_ids == hf_greedy(path, [prompt], 8)[0]
