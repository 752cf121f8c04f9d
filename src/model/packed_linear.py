"""Prepacked oneDNN weights for CPU float32 linear layers (decode GEMMs of few rows).

A decode step multiplies at most `max_num_seqs` rows by every weight matrix. For such shapes
torch's default CPU GEMM (MKL on a plain row-major weight) reaches a fraction of the machine's
rate; oneDNN with the weight reordered once into its blocked layout runs a SmolLM2 decode step
of 8-64 sequences 12-30% faster on a 2-core AVX-512 machine (benchmarks/RESULTS.md section 12).
Inputs of 4-64 rows take it, padded to an even count (see `linear`); others keep F.linear.

The worker packs after loading (`pack_linear_weights`), before it sizes the KV cache, so the
copy counts against memory. The original weights stay: the tied LM head shares its weight with
the embedding, and `load_weights` and the non-CPU paths use them. The copy is made only while it
costs less than `MAX_MEMORY_FRACTION` of the machine's RAM; `SHARDLINE_CPU_PACKED_LINEAR=off`
turns it off.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENV = "SHARDLINE_CPU_PACKED_LINEAR"
MODES = ("auto", "off")
BATCH_HINT = 64  # oneDNN picks its blocking for this many rows; 16 and 64 measured alike
MAX_MEMORY_FRACTION = 0.1
# oneDNN compiles (JIT) and caches a kernel per input shape: ~2-10 ms and ~0.6 MiB each; a
# server fed every prefill length grew by hundreds of MiB. So the packed path takes only
# decode-sized inputs, padded to a multiple of ROW_BUCKET rows, and compiles those shapes at
# start-up (`pack_linear_weights`: SmolLM2, 5 weight shapes x 32 row counts, 0.6 s and ~90 MiB;
# padding to 8 rows instead cost ~5% of decode throughput). Fewer than MIN_ROWS rows and more
# than MAX_ROWS (prefill chunks) use F.linear, which was as fast or faster there.
MIN_ROWS = 4
MAX_ROWS = 64
ROW_BUCKET = 2


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the packed copy of `weight` when there is one and
    `x` has a decode-sized number of rows."""
    rows = x.shape[0]
    if (packed is None or not MIN_ROWS <= rows <= MAX_ROWS or x.dim() != 2
            or x.dtype != torch.float32 or x.device.type != "cpu"):
        return F.linear(x, weight, bias)
    bucket = -(-rows // ROW_BUCKET) * ROW_BUCKET
    if bucket != rows:
        padded = x.new_zeros(bucket, x.shape[1])
        padded[:rows] = x
        x = padded
    out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return out[:rows] if bucket != rows else out


def _packable(weight: Any) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel() > 0
            and weight.device.type == "cpu" and weight.dtype == torch.float32)


def pack_linear_weights(model: nn.Module) -> int:
    """Give every CPU float32 layer with a `packed_weight` slot its packed copy; returns the
    bytes added (0 when off, not CPU float32, oneDNN missing, or too large for RAM)."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    layers: list[Any] = [m for m in model.modules() if hasattr(m, "packed_weight")
                         and _packable(getattr(m, "weight", None))]
    if mode == "off" or not layers or not torch.backends.mkldnn.is_available():
        return 0
    added = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    limit = MAX_MEMORY_FRACTION * psutil.virtual_memory().total
    if added > limit:
        logger.info("not packing linear weights for oneDNN: the copy (%.0f MiB) would exceed "
                    "%.0f%% of RAM", added / 2**20, 100 * MAX_MEMORY_FRACTION)
        return 0
    try:
        for m in layers:
            m.packed_weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), BATCH_HINT)
        _compile_buckets(layers)
    except (RuntimeError, AttributeError) as exc:  # a torch build without these ops
        for m in layers:
            m.packed_weight = None
        logger.warning("linear weights stay unpacked: %s", exc)
        return 0
    return added


def _compile_buckets(layers: list[Any]) -> None:
    """Run every row bucket once per distinct weight shape, so oneDNN compiles its kernels now
    rather than in the first requests' steps (layers of one shape share them)."""
    seen: set[tuple[Any, ...]] = set()
    with torch.inference_mode():
        for m in layers:
            key = (tuple(m.weight.shape), getattr(m, "bias", None) is not None)
            if key in seen:
                continue
            seen.add(key)
            for rows in range(ROW_BUCKET, MAX_ROWS + 1, ROW_BUCKET):
                x = torch.zeros(rows, m.weight.shape[1])
                linear(x, m.weight, getattr(m, "bias", None), m.packed_weight)
