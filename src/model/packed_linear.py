"""Prepacked CPU float32 linear weights and the decode GEMM that uses them (`csrc/cpu_gemm.cpp`).

A decode step multiplies a few rows (one per running sequence) by every weight matrix. For such
shapes torch's CPU GEMMs reach a fraction of the machine's rate, and each of a step's ~150 GEMMs
wakes the sleeping OpenMP thread (~90 us on a 2-core VM, under the PASSIVE wait policy workers
run with). `shardline::packed_gemm` multiplies by a copy of the weight stored as panels of 32
output columns (`pack_weight`), with register tiles of up to 12 rows, prefetching the next panel
while it computes, on its own threads, which stay awake between the GEMMs of one step (a bounded,
yielding spin; `SHARDLINE_CPU_SPIN_US`, default 200) and sleep between steps. A 30-layer stack
of SmolLM2's shapes: 1.4-1.5x faster than oneDNN with prepacked weights for 1-64 rows, 1.3-2.1x
faster than F.linear (benchmarks/RESULTS.md section 12). Inputs of up to MAX_ROWS rows take it;
larger ones (prefill chunks) keep F.linear, which was as fast from ~512 rows on.

The worker packs after loading (`pack_linear_weights`), before it sizes the KV cache, so the
copy counts against memory. The original weights stay: the tied LM head shares its weight with
the embedding, and `load_weights`, prefill and the non-CPU paths use them. The copy is made only
while it costs less than `MAX_MEMORY_FRACTION` of the machine's RAM, and only where the CPU
kernels build; `SHARDLINE_CPU_PACKED_LINEAR=off` turns it off.
"""

from __future__ import annotations

import logging
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from model import paged_decode
from model.env import env_choice
from model.memory import huge_page_zeros

logger = logging.getLogger(__name__)

ENV = "SHARDLINE_CPU_PACKED_LINEAR"
MODES = ("auto", "off")
PANEL = 32  # output columns per panel (csrc/cpu_gemm.cpp kNR)
MAX_ROWS = 256  # larger inputs use F.linear (equal speed at 512 rows, MKL's blocking beyond)
MAX_MEMORY_FRACTION = 0.1


def packed_numel(weight: torch.Tensor) -> int:
    return -(-weight.shape[0] // PANEL) * PANEL * weight.shape[1]


def pack_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` `[N, K]` as `[ceil(N / 32), K, 32]` panels (the last one zero-padded), written
    into `out` (a flat float32 tensor of `packed_numel(weight)` elements) when given."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = weight.new_zeros(panels * PANEL, k)
    padded[:n] = weight
    packed = padded.view(panels, PANEL, k).transpose(1, 2)
    if out is None:
        return packed.contiguous()
    view = out.view(panels, k, PANEL)
    view.copy_(packed)
    return view


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the packed copy of `weight` when there is one and
    `x` has a decode-sized number of rows."""
    rows = x.shape[0]
    if (packed is None or not 1 <= rows <= MAX_ROWS or x.dim() != 2
            or x.dtype != torch.float32 or x.device.type != "cpu"):
        return F.linear(x, weight, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty(rows, weight.shape[0])
    torch.ops.shardline.packed_gemm(out, x, packed, bias)
    return out


def _packable(weight: Any) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel() > 0
            and weight.device.type == "cpu" and weight.dtype == torch.float32)


def pack_linear_weights(model: nn.Module) -> int:
    """Give every CPU float32 layer with a `packed_weight` slot its packed copy; returns the
    bytes added (0 when off, not CPU float32, the kernels do not build, or too large for RAM)."""
    mode = env_choice(ENV, MODES)
    layers: list[Any] = [m for m in model.modules() if hasattr(m, "packed_weight")
                         and _packable(getattr(m, "weight", None))]
    if mode == "off" or not layers:
        return 0
    paged_decode.check_spin_setting()
    added = sum(packed_numel(m.weight) * 4 for m in layers)
    limit = MAX_MEMORY_FRACTION * psutil.virtual_memory().total
    if added > limit:
        logger.info("not packing linear weights: the copy (%.0f MiB) would exceed %.0f%% of RAM",
                    added / 2**20, 100 * MAX_MEMORY_FRACTION)
        return 0
    if not paged_decode.KERNEL.load():  # logs why, once
        return 0
    buffer = huge_page_zeros((added // 4,))  # one allocation for all, in huge pages
    offset = 0
    for m in layers:
        numel = packed_numel(m.weight)
        m.packed_weight = pack_weight(m.weight.detach(), buffer[offset : offset + numel])
        offset += numel
    return added
