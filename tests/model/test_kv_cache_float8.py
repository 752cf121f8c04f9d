"""float8 KV caches (`kv_cache_dtype` fp8 / fp8_e4m3 / fp8_e5m2, CUDA only at the engine level):
stores clamp to the type's finite range and round to nearest (scale 1.0), and attention reads
them through gather + convert + SDPA. The layer-level checks run on the CPU too (the layer does
not care where it runs; the engine refuses float8 there), the engine run on CUDA (`gpu`)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.model.attention import Attention, AttentionMetadata, to_cache_dtype
from support.generation import generate_all

FLOAT8 = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FLOAT8)
def test_float8_cache_stores_rounded_clamped_values_and_attends_over_them(device, kv_dtype):
    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, block = 8, 2, 64, 16
    layer = Attention(heads, dim, dim**-0.5, kv_heads)
    layer.kv_cache = torch.zeros(12, 2, block, kv_heads, dim, dtype=kv_dtype, device=device)
    tables = [[3, 7, 1], [10, 2]]
    # step 1: two prefills (25 and 20 tokens); step 2: one decode token each
    steps = [([25, 20], [0, 0]), ([1, 1], [25, 20])]
    limit = torch.finfo(kv_dtype).max
    for query_lens, context_lens in steps:
        attn = AttentionMetadata.build(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
            block_size=block,
            device=device,
        )
        tokens = sum(query_lens)
        q = torch.randn(tokens, heads * dim, generator=gen).to(device)
        k = torch.randn(tokens, kv_heads * dim, generator=gen).to(device)
        v = torch.randn(tokens, kv_heads * dim, generator=gen).to(device)
        k[0, :4] = torch.tensor([1e6, -1e6, limit * 1.01, 0.3])  # beyond the range: saturated
        out = layer(q, k, v, attn)
    assert not layer.kv_cache.float().isnan().any() and not layer.kv_cache.float().isinf().any()
    first = layer.kv_cache[7, 0, 9].float().flatten()  # the last step's row 0: seq 0's position 25
    assert first[:4].tolist() == [
        limit,
        -limit,
        limit,
        to_cache_dtype(torch.tensor([0.3]), kv_dtype).float().item(),
    ]
    # the decode rows equal attention over the stored values widened to float32 (CUDA's
    # float32 SDPA kernels differ a little more between the masked batch and this call)
    tol = 1e-5 if device == "cpu" else 2e-4
    for i, (row, length) in enumerate(zip([0, 1], [26, 21], strict=True)):
        blocks = torch.tensor(tables[i], device=device)
        key = layer.kv_cache.float()[blocks, 0].flatten(0, 1)[:length]  # [L, kv_heads, D]
        value = layer.kv_cache.float()[blocks, 1].flatten(0, 1)[:length]
        query = q[row].view(heads, 1, dim)
        want = torch.nn.functional.scaled_dot_product_attention(
            query,
            key.transpose(0, 1).repeat_interleave(4, 0),
            value.transpose(0, 1).repeat_interleave(4, 0),
            scale=dim**-0.5,
        )
        torch.testing.assert_close(out[row].view(heads, dim), want.squeeze(1), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("value", ["fp8", "fp8_e5m2"])
async def test_engine_serves_with_a_float8_cache(tiny_llama_dir: pathlib.Path, value: str) -> None:
    """On CUDA: twice the blocks of the bfloat16 ("auto") cache for the same bytes, and greedy
    tokens that mostly agree with it (float8 keeps 3 or 2 mantissa bits: runs may part)."""
    prompts = [
        [3, 256, 70, 71, 10],
        [5, 6, 7],
        list(range(20, 61)),
        [300, 301, 302, 303, 304, 305, 306],
    ]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results, blocks = {}, {}
    for kv in ("auto", value):
        cfg = EngineConfig(
            model=str(tiny_llama_dir),
            device="cuda",
            max_model_len=256,
            block_size=4,
            kv_cache_memory_bytes=1 << 20,
            kv_cache_dtype=kv,
        )
        async with await Engine.start(cfg) as engine:
            blocks[kv] = engine.stats().num_kv_blocks_total
            results[kv] = await generate_all(engine, prompts, params)
            again = await generate_all(engine, prompts[:1], params)  # still serving, alone
            assert len(again[0]) == 12  # (alone, CUDA's kernels may break a near-tie otherwise)
    assert blocks[value] == 2 * blocks["auto"]
    first_tokens = sum(a[0] == b[0] for a, b in zip(results[value], results["auto"], strict=True))
    assert first_tokens >= 2, results
