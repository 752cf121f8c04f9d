"""Prepacked oneDNN weights for CPU float32 linear layers (decode GEMMs of few rows).

A decode step multiplies at most `max_num_seqs` rows by every weight matrix. For such shapes
torch's default CPU GEMM (MKL on a plain row-major weight) reaches a fraction of the machine's
rate; oneDNN with the weight reordered once into its blocked layout runs a SmolLM2 decode step
of 8-64 sequences 12-30% faster on a 2-core AVX-512 machine, and a 2,048-token prefill as fast
as before (benchmarks/RESULTS.md section 12).

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the packed copy of `weight` when there is one."""
    if packed is not None and x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


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
    except (RuntimeError, AttributeError) as exc:  # a torch build without these ops
        for m in layers:
            m.packed_weight = None
        logger.warning("linear weights stay unpacked: %s", exc)
        return 0
    return added
