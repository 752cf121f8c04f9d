"""Fixtures for end-to-end engine tests: the default model, a tiny model, HF references."""

from __future__ import annotations

import pathlib

import pytest

from support.prompts import MAX_TOKENS, PROMPTS


@pytest.fixture(scope="session")
def hf_greedy(smollm2_dir: pathlib.Path) -> dict[str, list[int]]:
    """Hugging Face `generate` greedy continuations of PROMPTS (token ids), one prompt at a time."""
    import torch
    from transformers import AutoTokenizer

    from support.hf_reference import hf_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = hf_causal_lm(smollm2_dir)
    model.eval()
    out: dict[str, list[int]] = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            out[prompt] = gen[0, ids.shape[1] :].tolist()
    return out
