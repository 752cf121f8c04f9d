"""16-bit KV caches (`EngineConfig.kv_cache_dtype`) against the float32 cache, model level.

The tiny random Llama and the default model run a batch of prompts through prefill, a chunk over
the cached prefix and decode steps (support/kv_accuracy.py), packed as the worker loads them, so
the decode steps go through the C++ decoder loop and the decode kernel reading 16-bit K/V. The
bounds are set from the measured errors (docs/KV_CACHE.md) with room: float16 keeps 10 mantissa
bits, bfloat16 7, so bfloat16's error is about 8x float16's.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.model import paged_decode
from shardline.model.attention import Attention, AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.packed_linear import load_packed_model
from shardline.model.parallel_context import ParallelContext
from support.kv_accuracy import compare, run_batch

# max relative logit error (of the largest |logit|) allowed; measured ~4e-4 / ~3e-3 (tiny model)
# and ~7e-4 / ~6e-3 (default model)
MAX_REL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir: pathlib.Path) -> torch.nn.Module:
    paged_decode.KERNEL.require()
    model, _ = load_packed_model(ModelConfig.from_path(tiny_llama_dir), ParallelContext.single())
    return model


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tiny_model_logits_and_greedy_tokens_against_a_float32_cache(tiny_model, kv_dtype):
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 250, (n,), generator=gen).tolist()
        for n in (7, 16, 17, 40, 90, 130, 33, 64)
    ]
    accuracy = compare(tiny_model, prompts, 48, kv_dtype)
    caches = [m.kv_cache for m in tiny_model.modules() if isinstance(m, Attention)]
    assert caches and all(c.dtype == kv_dtype for c in caches)  # the last run's cache
    assert 0 < accuracy.max_rel < MAX_REL[kv_dtype], accuracy  # > 0: the values really were rounded
    assert accuracy.argmax_agreement >= 0.98, accuracy
    # free-running greedy tokens: most sequences never diverge (measured: 7 or 8 of 8)
    assert sum(n == accuracy.steps for n in accuracy.free_run_prefix) >= 6, accuracy


def test_a_float32_cache_is_what_it_was(tiny_model):
    """kv_cache_dtype "auto" on CPU: a float32 cache gives the float32 cache's results exactly,
    run after run (nothing of the 16-bit paths touches it)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (9, 33)]
    first = run_batch(tiny_model, prompts, 8, torch.float32)
    run_batch(tiny_model, prompts, 8, torch.float16)
    again = run_batch(tiny_model, prompts, 8, torch.float32)
    assert first.tokens == again.tokens
    for a, b in zip(first.logits, again.logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_default_model_float16_cache_against_float32(smollm2_dir):
    """SmolLM2 with a float16 cache: measured on 8 prompts x 64 tokens, max |logit error| 0.030
    (7e-4 of the largest logit), every teacher-forced greedy pick and every free-running token
    the same as with the float32 cache; here 8 prompts x 32 tokens."""
    from transformers import AutoTokenizer

    paged_decode.KERNEL.require()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model, _ = load_packed_model(ModelConfig.from_path(smollm2_dir), ParallelContext.single())
    texts = [
        "The quick brown fox jumps over the lazy dog. The dog",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "Paris is the capital of France. Berlin is the capital of",
        "In 1969, Neil Armstrong became the first person to",
        "Write a short poem about the sea and the wind.",
        "The three primary colors of light are",
        "Once upon a time, in a small village,",
        "import numpy as np\nx = np.arange(10)\n",
    ]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    accuracy = compare(model, prompts, 32, torch.float16)
    assert 0 < accuracy.max_rel < MAX_REL[torch.float16], accuracy
    assert accuracy.argmax_agreement >= 0.98, accuracy
    # Greedy runs may part after a near-tie; most tokens must still agree.
    assert sum(accuracy.free_run_prefix) >= 0.75 * len(prompts) * accuracy.steps, accuracy


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_a_16bit_model_on_cpu_keeps_gather_and_sdpa(monkeypatch, model_dtype):
    """A CPU model computing in bfloat16/float16 (dtype="bfloat16") has a cache of that dtype
    too; the kernel takes float32 queries only, so such a layer decodes through gather + SDPA,
    with the kernel mode on or off alike."""
    outputs = []
    for mode in ("kernel", "sdpa"):
        monkeypatch.setenv(paged_decode.MODE_ENV, mode)
        gen = torch.Generator().manual_seed(2)
        layer = Attention(4, 64, 0.125, 2)
        layer.kv_cache = torch.zeros(8, 2, 16, 2, 64, dtype=model_dtype)
        step = []
        for query_len, context_len in ((20, 0), (1, 20), (3, 21)):
            attn = AttentionMetadata.build(
                query_lens=[query_len],
                context_lens=[context_len],
                block_tables=[[5, 2]],
                block_size=16,
            )
            q, k, v = (
                torch.randn(query_len, n * 64, generator=gen).to(model_dtype) for n in (4, 2, 2)
            )
            step.append(layer(q, k, v, attn))
        outputs.append(step)
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
