"""Prefill attention of a chunk over its cached context without a score-sized mask (CPU).

A prefill chunk of `Lq` queries at positions ``context_len .. context_len + Lq - 1`` sees every
cached key before it and, within the chunk, the keys up to its own position. One SDPA call with
a boolean ``[Lq, Lk]`` mask expresses that, but torch's CPU flash kernel first turns the mask
into a float ``[Lq, Lk]`` tensor (256 MiB for a 2,048-token chunk at 32k context, per layer)
and reads it for every head. Here the keys are split instead:

* the context ``[0, context_len)``: every query sees every key, so no mask at all; the query
  heads that share a KV head are stacked along the sequence axis (``[kv_heads, group * Lq, D]``),
  so the cached K/V are read as they are, without a per-head copy;
* the chunk's own keys: a square causal block (the flash kernel skips its upper tiles).

Each part comes back with its log-sum-exp (torch's flash kernel returns it), and the two are
merged exactly as flash attention merges its tiles: ``out = sum_i exp(lse_i - lse) * out_i``
with ``lse = logaddexp(lse_1, lse_2)``. Nothing of size ``Lq x Lk`` is ever allocated. The
result equals the masked SDPA within float32 rounding (tests/model/test_flash_prefix.py).

Below `MIN_CONTEXT` cached keys the masked call is as fast or faster (the two calls' fixed
costs dominate; measured in benchmarks/RESULTS.md section 24), so `attend` returns None there
and the caller keeps its masked path.
"""

from __future__ import annotations

import os

import torch

# The masked SDPA is no slower below this much context (512-token chunks, 2 threads);
# SHARDLINE_FLASH_PREFIX_MIN_CONTEXT moves the threshold (a huge value turns the split off).
MIN_CONTEXT = int(os.environ.get("SHARDLINE_FLASH_PREFIX_MIN_CONTEXT", "4096"))
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available(q: torch.Tensor) -> bool:
    """Whether `attend` can run for queries like `q` (float32 on the CPU, the kernel present)."""
    return _FLASH is not None and q.device.type == "cpu" and q.dtype == torch.float32


def attend(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    context_len: int,
    scale: float,
    *,
    min_context: int | None = None,
) -> torch.Tensor | None:
    """q ``[Lq, heads, D]`` (positions ``context_len..``), key/value ``[kv_heads, context_len + Lq, D]``
    -> ``[Lq, heads, D]``; None where the masked path should run instead (see the module doc)."""
    least = MIN_CONTEXT if min_context is None else min_context
    if context_len < max(1, least) or not available(q) or key.dtype != q.dtype:
        return None
    assert _FLASH is not None
    num_queries, heads, dim = q.shape
    kv_heads = key.shape[0]
    group = heads // kv_heads
    if key.shape[1] != context_len + num_queries:
        raise ValueError(
            f"keys cover {key.shape[1]} positions, expected context {context_len} + {num_queries} queries"
        )
    by_head = q.transpose(0, 1)  # [heads, Lq, D]
    stacked = by_head.reshape(kv_heads, group * num_queries, dim)
    past, past_lse = _FLASH(
        stacked.unsqueeze(0),
        key[:, :context_len].unsqueeze(0),
        value[:, :context_len].unsqueeze(0),
        0.0,
        False,
        scale=scale,
    )
    past = past[0].reshape(heads, num_queries, dim)
    past_lse = past_lse[0].reshape(heads, num_queries)
    own_key, own_value = key[:, context_len:], value[:, context_len:]
    if group > 1:
        own_key = own_key.repeat_interleave(group, dim=0)
        own_value = own_value.repeat_interleave(group, dim=0)
    own, own_lse = _FLASH(
        by_head.unsqueeze(0), own_key.unsqueeze(0), own_value.unsqueeze(0), 0.0, True, scale=scale
    )
    own, own_lse = own[0], own_lse[0]
    total = torch.logaddexp(past_lse, own_lse)
    out = past * torch.exp(past_lse - total).unsqueeze(-1)
    out.addcmul_(own, torch.exp(own_lse - total).unsqueeze(-1))
    return out.transpose(0, 1)
