"""The split (no-mask) prefill attention over cached context equals one masked SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardline.model import flash_prefix


def masked_reference(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context_len: int, scale: float
) -> torch.Tensor:
    total = key.shape[1]
    query_pos = torch.arange(context_len, total)
    mask = torch.arange(total)[None, :] <= query_pos[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        key.unsqueeze(0),
        value.unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != key.shape[0],
    )
    return out[0].transpose(0, 1)


def paged_like(total: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # K/V as the engine's gather returns them: views [kv_heads, L, D] of [L, kv_heads, D] rows.
    rows = torch.randn(total, 2, kv_heads, dim)
    return rows[:, 0].transpose(0, 1), rows[:, 1].transpose(0, 1)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "queries", "context"),
    [(9, 3, 64, 700), (8, 8, 33, 129), (8, 2, 1, 17), (4, 1, 128, 2048), (6, 3, 17, 1)],
)
def test_equals_masked_sdpa(heads: int, kv_heads: int, queries: int, context: int) -> None:
    torch.manual_seed(heads * 1000 + context)
    dim = 64
    q = torch.randn(queries, heads, dim)
    key, value = paged_like(context + queries, kv_heads, dim)
    got = flash_prefix.attend(q, key, value, context, 0.125, min_context=1)
    assert got is not None
    want = masked_reference(q, key, value, context, 0.125)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_off_by_one_mask_is_told_apart() -> None:
    # The comparison above can fail: a reference whose queries do not see their own key differs.
    torch.manual_seed(0)
    q = torch.randn(16, 4, 64)
    key, value = paged_like(16 + 100, 2, 64)
    got = flash_prefix.attend(q, key, value, 100, 0.125, min_context=1)
    assert got is not None
    query_pos = torch.arange(100, 116)
    strict = torch.arange(116)[None, :] < query_pos[:, None]
    off_by_one = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        key.unsqueeze(0),
        value.unsqueeze(0),
        attn_mask=strict,
        scale=0.125,
        enable_gqa=True,
    )[0].transpose(0, 1)
    assert not torch.allclose(got, off_by_one, rtol=1e-3, atol=1e-3)


def test_short_context_and_other_dtypes_keep_the_masked_path() -> None:
    q = torch.randn(8, 4, 64)
    key, value = paged_like(8 + 100, 2, 64)
    assert flash_prefix.attend(q, key, value, 100, 0.125) is None  # below MIN_CONTEXT
    assert (
        flash_prefix.attend(
            q.bfloat16(), key.bfloat16(), value.bfloat16(), 100, 0.125, min_context=1
        )
        is None
    )
    with pytest.raises(ValueError, match="keys cover"):
        flash_prefix.attend(q, key[:, :50], value[:, :50], 100, 0.125, min_context=1)
