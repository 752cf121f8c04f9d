"""A windowed or soft-capped layer's decode batch (issue 24): requests whose window still reaches
their first token (all, in a global soft-capped layer) attend in one batch (the fused kernel on
CPU; one padded soft-capped softmax when the layer caps scores), the others request by request
over their window's blocks; every output equals attention masked to the window (scores capped
first), computed from the whole K/V. Blocks wholly before a window are poisoned to show they
are never read."""

from __future__ import annotations

import pytest
import torch

from shardline.model.attention import Attention, AttentionMetadata

HEADS, KV_HEADS, HEAD_DIM, BLOCK, WINDOW = 4, 2, 16, 4, 8


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Each position over the keys (p - window, p] of its own sequence. q/k/v `[L, heads, D]`."""
    length = q.shape[0]
    pos = torch.arange(length)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize(("window", "softcap"), [(WINDOW, None), (WINDOW, 5.0), (None, 5.0)])
@pytest.mark.parametrize("lengths", [[3, 8, 9, 21], [1, 2], [12, 30]])
def test_windowed_decode_batch_equals_masked_attention(
    lengths: list[int], window: int | None, softcap: float | None
) -> None:
    torch.manual_seed(0)
    scale = HEAD_DIM**-0.5
    layer = Attention(
        HEADS, HEAD_DIM, scale, KV_HEADS, sliding_window=window, logit_softcap=softcap
    )
    tables, next_block = [], 0
    for length in lengths:
        count = -(-length // BLOCK)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    layer.kv_cache = torch.zeros(next_block, 2, BLOCK, KV_HEADS, HEAD_DIM)
    seqs = [
        (
            torch.randn(n, HEADS, HEAD_DIM),
            torch.randn(n, KV_HEADS, HEAD_DIM),
            torch.randn(n, KV_HEADS, HEAD_DIM),
        )
        for n in lengths
    ]
    # Prefill all but the last token of each sequence, then poison the blocks every window has
    # left behind (a block the engine may have given to another request).
    prefill = [n - 1 for n in lengths]
    meta = AttentionMetadata.build(
        query_lens=prefill, context_lens=[0] * len(lengths), block_tables=tables, block_size=BLOCK
    )
    flat = [
        torch.cat([s[j][: n - 1] for s, n in zip(seqs, lengths, strict=True)]) for j in range(3)
    ]
    layer(flat[0].flatten(1), flat[1].flatten(1), flat[2].flatten(1), meta)
    for table, n in zip(tables, lengths, strict=True):
        first_needed = 0 if window is None else max(0, n - window)
        for block in table[: first_needed // BLOCK]:
            layer.kv_cache[block] = float("nan")
    # One decode step for every sequence at once.
    meta = AttentionMetadata.build(
        query_lens=[1] * len(lengths), context_lens=prefill, block_tables=tables, block_size=BLOCK
    )
    last = [
        torch.stack([s[j][n - 1] for s, n in zip(seqs, lengths, strict=True)]) for j in range(3)
    ]
    out = layer(last[0].flatten(1), last[1].flatten(1), last[2].flatten(1), meta).view(
        -1, HEADS, HEAD_DIM
    )
    for row, ((q, k, v), n) in enumerate(zip(seqs, lengths, strict=True)):
        want = reference(q, k, v, scale, window, softcap)[n - 1]
        torch.testing.assert_close(out[row], want, rtol=1e-5, atol=1e-5)
