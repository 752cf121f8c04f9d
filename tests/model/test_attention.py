"""Paged attention against a dense reference: prefill, cached prefix, decode, mixed batches."""

from __future__ import annotations

import math

import pytest
import torch

from shardline.model import attention, flash_prefix
from shardline.model.attention import Attention, AttentionMetadata

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int) -> torch.Tensor:
    """Dense causal attention of queries at positions context_len.. over keys 0..len(k)-1."""
    group = HEADS // KV_HEADS
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
    q_pos = torch.arange(context_len, context_len + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_layer(num_blocks: int = 32) -> Attention:
    layer = Attention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS)
    layer.kv_cache = torch.zeros(num_blocks, 2, BLOCK, KV_HEADS, HEAD_DIM)
    return layer


def run_batch(layer, full_k, full_v, full_q, steps, tables):
    """Schedule {seq: (context_len, query_len)} and check every query row against the reference."""
    names = list(steps)
    attn = AttentionMetadata.build(
        query_lens=[steps[n][1] for n in names], context_lens=[steps[n][0] for n in names],
        block_tables=[tables[n] for n in names], block_size=BLOCK,
    )
    sl = lambda t, n: t[n][steps[n][0]:steps[n][0] + steps[n][1]]  # noqa: E731
    q = torch.cat([sl(full_q, n) for n in names])
    k = torch.cat([sl(full_k, n) for n in names])
    v = torch.cat([sl(full_v, n) for n in names])
    out = layer(q.flatten(1), k.flatten(1), v.flatten(1), attn).view(-1, HEADS, HEAD_DIM)
    start = 0
    for n in names:
        ctx, qlen = steps[n]
        want = reference(sl(full_q, n), full_k[n][:ctx + qlen], full_v[n][:ctx + qlen], ctx)
        torch.testing.assert_close(out[start:start + qlen], want, rtol=1e-5, atol=1e-5)
        start += qlen


@pytest.fixture
def seqs():
    gen = torch.Generator().manual_seed(0)
    lens = {"a": 19, "b": 9, "c": 14}
    mk = lambda h, n: torch.randn(n, h, HEAD_DIM, generator=gen)  # noqa: E731
    return ({n: mk(HEADS, length) for n, length in lens.items()},
            {n: mk(KV_HEADS, length) for n, length in lens.items()},
            {n: mk(KV_HEADS, length) for n, length in lens.items()},
            {"a": [7, 2, 11, 4, 20], "b": [3, 9, 1], "c": [15, 5, 30, 8]})


@pytest.mark.parametrize("split_prefix", [False, True], ids=["masked-prefix", "flash-split-prefix"])
def test_prefill_then_chunk_then_mixed_decode(seqs, monkeypatch, split_prefix):
    # flash-split-prefix: every cached-prefix chunk takes model/flash_prefix.py's mask-free path
    # (in production only from MIN_CONTEXT cached tokens on).
    monkeypatch.setattr(flash_prefix, "MIN_CONTEXT", 1 if split_prefix else 1 << 30)
    if split_prefix:  # short chunks would otherwise go row by row through the decode kernel
        monkeypatch.setattr(attention, "ROWWISE_MAX_QUERY", 0)
    q, k, v, tables = seqs
    layer = make_layer()
    run_batch(layer, k, v, q, {"a": (0, 17), "b": (0, 6)}, tables)            # fresh prefills
    run_batch(layer, k, v, q, {"a": (17, 1), "b": (6, 2), "c": (0, 5)}, tables)  # mixed
    run_batch(layer, k, v, q, {"c": (5, 7), "b": (8, 1)}, tables)           # cached prefix
    run_batch(layer, k, v, q, {"a": (18, 1), "c": (12, 1)}, tables)          # decode only
    run_batch(layer, k, v, q, {"c": (13, 1)}, tables)


def test_slot_mapping_writes_each_token_to_its_block_offset(seqs):
    q, k, v, tables = seqs
    layer = make_layer()
    run_batch(layer, k, v, q, {"a": (0, 6)}, tables)
    for pos in range(6):
        block, offset = tables["a"][pos // BLOCK], pos % BLOCK
        assert torch.equal(layer.kv_cache[block, 0, offset], k["a"][pos])
        assert torch.equal(layer.kv_cache[block, 1, offset], v["a"][pos])
    untouched = [b for b in range(32) if b not in tables["a"][:2]]
    assert not layer.kv_cache[untouched].any()


def test_fresh_prefill_without_cache_and_refusal_with_context(seqs):
    q, k, v, _ = seqs
    layer = Attention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS)
    attn = AttentionMetadata.build(query_lens=[5], context_lens=[0], block_tables=[[0, 1]], block_size=BLOCK)
    out = layer(q["a"][:5].flatten(1), k["a"][:5].flatten(1), v["a"][:5].flatten(1), attn)
    torch.testing.assert_close(out.view(5, HEADS, HEAD_DIM), reference(q["a"][:5], k["a"][:5], v["a"][:5], 0))
    attn = AttentionMetadata.build(query_lens=[1], context_lens=[5], block_tables=[[0, 1]], block_size=BLOCK)
    with pytest.raises(RuntimeError, match="kv_cache"):
        layer(q["a"][5:6].flatten(1), k["a"][5:6].flatten(1), v["a"][5:6].flatten(1), attn)


def test_metadata_refuses_a_table_too_small():
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        AttentionMetadata.build(query_lens=[9], context_lens=[0], block_tables=[[1, 2]], block_size=4)


@pytest.mark.parametrize("cap", [2048, 10])
def test_batched_fresh_prefills_match_the_reference(seqs, monkeypatch, cap):
    """Neighbouring fresh prefills in one block-diagonal masked SDPA (the CUDA path, forced on
    here), next to a cached-prefix chunk and a decode; with a small cap the run of fresh
    prefills splits into several calls."""
    import shardline.model.attention as attention

    monkeypatch.setattr(attention, "FRESH_BATCH_MAX_TOKENS", cap)
    q, k, v, tables = seqs
    layer = make_layer()
    layer.batch_fresh_prefills = True
    run_batch(layer, k, v, q, {"a": (0, 17), "b": (0, 1), "c": (0, 5)}, tables)  # fresh x3
    run_batch(layer, k, v, q, {"c": (5, 7), "a": (17, 1), "b": (1, 8)}, tables)  # prefix, decode, chunk


def test_fresh_groups_are_adjacent_runs_within_the_cap(monkeypatch):
    import shardline.model.attention as attention

    monkeypatch.setattr(attention, "FRESH_BATCH_MAX_TOKENS", 8)
    # query lens 3, 4, 1(decode), 5, 4, 2 -> fresh: 0, 1 | 3 | 4, 5 (3 + 4 <= 8, 5 + 4 > 8)
    starts = [0, 3, 7, 8, 13, 17, 19]
    seq_lens = [3, 4, 10, 5, 4, 2]
    assert attention._fresh_groups(starts, seq_lens) == [[0, 1], [3], [4, 5]]
