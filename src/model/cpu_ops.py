"""Fused CPU float32 element-wise ops of a decoder layer (`csrc/cpu_ops.cpp`).

RMSNorm (with its residual add), the rotary embedding, SwiGLU's `silu(gate) * up` and the
KV-cache store (into a float32, float16 or bfloat16 cache) each run as one C++ pass instead of 3-12 torch ops. On CPU that matters twice:
every torch op pays Python dispatch and a temporary, and every op big enough for torch to split
over threads wakes the sleeping OpenMP threads (workers default to the PASSIVE wait policy),
~100 us a time on a 2-core VM. A SmolLM2 decode step had ~1,000 ops; these ops leave ~250.

They are built into the same extension as the decode-attention kernel (`model.paged_decode`,
once per machine) and used for CPU float32 tensors when it loads. `SHARDLINE_CPU_FUSED_OPS=off`
keeps the plain torch expressions (the reference the tests compare with); `auto` (default)
uses the ops when the extension can be built, torch otherwise.

The greedy sampler's row argmax over the vocabulary is here too: torch's took 4.6 ms for 64 x
49,152 logits on one thread, a few percent of a decode step.
"""

from __future__ import annotations

import torch

from shardline.model import paged_decode
from shardline.model.env import env_choice

ENV = "SHARDLINE_CPU_FUSED_OPS"
MODES = ("auto", "off")
_loaded = False  # the extension is loaded in this process (it must never load twice)


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused ops handle `x` (read at every call, so tests can switch)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if env_choice(ENV, MODES) == "off":
        return False
    global _loaded
    if not _loaded:
        _loaded = paged_decode.KERNEL.load()
    return _loaded


def store_kv_enabled(kv_cache: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `store_kv` takes float32 rows `k` into `kv_cache`: a CPU float32 cache, or a
    float16/bfloat16 one (rounded to nearest even, as `.to(dtype)` rounds)."""
    if kv_cache.dtype not in paged_decode.KV_DTYPES or k.dtype != torch.float32:
        return False
    return enabled(k)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops.shardline.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """In place: `residual += x`, then `x = rms_norm(residual)`."""
    torch.ops.shardline.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Rotate q `[T, heads * D]` and k `[T, kv_heads * D]` in place (neox style)."""
    torch.ops.shardline.rotary_embedding(positions.contiguous(), q, k, cos_cache, sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops.shardline.silu_and_mul(out, x)
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write rows k/v `[T, kv_heads * D]` at their slots of `kv_cache`
    (`[num_blocks, 2, block_size, kv_heads, D]`)."""
    torch.ops.shardline.store_kv(k, v, kv_cache, slot_mapping)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a `[rows, V]` tensor with contiguous rows, split over the threads."""
    out = torch.empty(x.shape[0], dtype=torch.long)
    torch.ops.shardline.argmax_rows(out, x)
    return out
