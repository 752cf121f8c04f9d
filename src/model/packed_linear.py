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

Weights that are exactly `d * q + m` per 32 inputs of an output (q int8; what GGUF's Q4_1, Q4_0
and Q8_0 dequantize to, so SmolLM2's every linear weight and its tied LM head) are packed as
integer blocks instead (`integer_blocks`, `pack_blocks`): 1,280 bytes per 32 x 32 block instead
of 4,096. The kernel turns them back into float32 a slice at a time in L1 and runs the same
tiles, so the results are the float32 panels' bit for bit, while a decode step, which streams
every weight from memory, reads 3.2x fewer bytes (SmolLM2: 160 MiB instead of 513). Every value
is checked when packing; a weight of any other form keeps float32 panels.

The worker packs after loading (`pack_linear_weights`), before it sizes the KV cache, so the
copy counts against memory. The original weights stay: the tied LM head shares its weight with
the embedding, and `load_weights`, prefill and the non-CPU paths use them. The copy is made only
while it costs less than `MAX_MEMORY_FRACTION` of the machine's RAM, and only where the CPU
kernels build; `SHARDLINE_CPU_PACKED_LINEAR=float32` keeps every weight in float32 panels, `off`
turns packing off.
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
MODES = ("auto", "float32", "off")
PANEL = 32  # output columns per panel (csrc/cpu_gemm.cpp kNR)
BLOCK_K = 32  # inputs per integer block (kBlockK)
BLOCK_BYTES = 2 * PANEL * 4 + BLOCK_K * PANEL  # d[32] and m[32] float32, q[32][32] int8
MAX_ROWS = 256  # larger inputs use F.linear (equal speed at 512 rows, MKL's blocking beyond)
MAX_MEMORY_FRACTION = 0.1
_DETECT_ROWS = 4096  # integer_blocks works on this many output rows at a time


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


IntegerBlocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def integer_blocks(weight: torch.Tensor) -> IntegerBlocks | None:
    """`(d, m, q)` with `weight[n, k] == d[n, k // 32] * q[n, k] + m[n, k // 32]` bit for bit, q
    int8 and d float16-valued (so `d * q` is exact in float32); None when `weight` is not of that
    form. GGUF's Q4_1, Q4_0 and Q8_0 weights, dequantized to float32, are: each block of 32 is
    tried as Q4_1 (m its minimum, d within a float16 step of (max - min) / 15, q in 0..15), as
    Q8_0 and as Q4_0 (no m; d = +-max |w| / 127, / 8 or / 7), with d and m float16 values as
    GGUF stores them, and every value is checked."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK_K:
        return None
    n, k = weight.shape
    d = torch.empty(n, k // BLOCK_K)
    m = torch.empty(n, k // BLOCK_K)
    q = torch.empty(n, k, dtype=torch.int8)
    for r0 in range(0, n, _DETECT_ROWS):
        rows = slice(r0, min(n, r0 + _DETECT_ROWS))
        found = _find_blocks(weight[rows].reshape(-1, BLOCK_K))
        if found is None:
            return None
        count = rows.stop - rows.start
        d[rows], m[rows], q[rows] = (t.view(count, -1) for t in found)
    return d, m, q


def _find_blocks(blocks: torch.Tensor) -> IntegerBlocks | None:
    """d, m [B] and q [B, 32] for every row of `blocks` [B, 32] (see `integer_blocks`), or None
    when some row is none of the forms tried."""
    count = blocks.shape[0]
    d, m = torch.zeros(count), torch.zeros(count)
    q = torch.zeros(count, BLOCK_K, dtype=torch.int8)
    pending = torch.ones(count, dtype=torch.bool)  # blocks no candidate has fitted yet
    low, high = blocks.amin(1), blocks.amax(1)
    amax = blocks.abs().amax(1)
    step = ((high - low) / 15).half().view(torch.int16)
    # m = -0.0 where there is none: d * q + (-0.0) is d * q, even when that is -0.0 (Q4_0's
    # d * (q - 8) with a negative d), which + 0.0 would turn into 0.0.
    no_offset = torch.full_like(low, -0.0)

    def q4_1(ulp: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        return (step + ulp).view(torch.float16).float(), low, 0, 15

    def scaled(levels: int, sign: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        return sign * amax / levels, no_offset, -levels, levels

    # (d, m, smallest q, largest q) for every block, the likeliest first: a pass over blocks
    # that fit an earlier candidate costs nothing. d and m must be float16 values (as GGUF
    # stores them; d * q is then exact in float32): blocks where they are not skip the pass.
    candidates = [q4_1(0), scaled(127, 1), q4_1(1), q4_1(-1), scaled(127, -1),
                  *(scaled(levels, sign) for levels in (8, 7) for sign in (1, -1))]
    for scale, offset, q_min, q_max in candidates:
        usable = ((scale == scale.half().float()) & (offset == offset.half().float())
                  & torch.isfinite(scale))
        rows = (pending & usable).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        values, scale, offset = blocks[rows], scale[rows], offset[rows]
        divisor = torch.where(scale != 0, scale, torch.ones_like(scale))[:, None]
        levels = torch.round((values - offset[:, None]) / divisor).clamp_(q_min, q_max)
        levels = torch.where(scale[:, None] != 0, levels, torch.zeros_like(levels))
        levels = levels.to(torch.int8).float()  # as the kernel sees them: no -0.0
        exact = (_bits(scale[:, None] * levels + offset[:, None]) == _bits(values)).all(1)
        hit = rows[exact]
        d[hit], m[hit], q[hit] = scale[exact], offset[exact], levels[exact].to(torch.int8)
        pending[hit] = False
        if not pending.any():
            return d, m, q
    return None


def blocks_nbytes(weight: torch.Tensor) -> int:
    return -(-weight.shape[0] // PANEL) * (weight.shape[1] // BLOCK_K) * BLOCK_BYTES


def pack_blocks(blocks: IntegerBlocks, out: torch.Tensor | None = None) -> torch.Tensor:
    """`integer_blocks`' `(d, m, q)` of an `[N, K]` weight as the kernel's integer panels: uint8
    `[ceil(N / 32), K / 32, 1280]` (per 32 x 32 block: d[32], m[32], then q[k][n]), written into
    `out` (a flat uint8 tensor of `blocks_nbytes` bytes) when given. Padding columns are 0."""
    d, m, q = blocks
    n, k = q.shape
    panels, kb = -(-n // PANEL), k // BLOCK_K

    def padded(t: torch.Tensor) -> torch.Tensor:
        full = t.new_zeros(panels * PANEL, *t.shape[1:])
        full[:n] = t
        return full

    def scales(t: torch.Tensor) -> torch.Tensor:  # [panels, kb, 32 columns] as bytes
        return padded(t).view(panels, PANEL, kb).transpose(1, 2).contiguous().view(torch.uint8)

    levels = padded(q).view(panels, PANEL, kb, BLOCK_K).permute(0, 2, 3, 1).reshape(panels, kb, -1)
    packed = torch.cat([scales(d), scales(m), levels.view(torch.uint8)], dim=2)
    if out is None:
        return packed
    view = out.view(panels, kb, BLOCK_BYTES)
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
    """Give every CPU float32 layer with a `packed_weight` slot its packed copy: integer blocks
    where the weight is exactly of that form (`integer_blocks`; not in mode `float32`), float32
    panels otherwise. Returns the bytes added (0 when off, not CPU float32, the kernels do not
    build, or too large for RAM)."""
    mode = env_choice(ENV, MODES)
    layers: list[Any] = [m for m in model.modules() if hasattr(m, "packed_weight")
                         and _packable(getattr(m, "weight", None))]
    if mode == "off" or not layers:
        return 0
    paged_decode.check_spin_setting()
    if not paged_decode.KERNEL.load():  # logs why, once
        return 0
    plans: list[tuple[Any, IntegerBlocks | None, int]] = []
    for m in layers:
        blocks = integer_blocks(m.weight.detach()) if mode == "auto" else None
        nbytes = blocks_nbytes(m.weight) if blocks is not None else packed_numel(m.weight) * 4
        plans.append((m, blocks, nbytes))
    added = sum(nbytes for _, _, nbytes in plans)
    limit = MAX_MEMORY_FRACTION * psutil.virtual_memory().total
    if added > limit:
        logger.info("not packing linear weights: the copy (%.0f MiB) would exceed %.0f%% of RAM",
                    added / 2**20, 100 * MAX_MEMORY_FRACTION)
        return 0
    buffer = huge_page_zeros((added,), torch.uint8)  # one allocation for all, in huge pages
    offset = 0
    for m, blocks, nbytes in plans:
        out = buffer[offset : offset + nbytes]
        if blocks is not None:
            m.packed_weight = pack_blocks(blocks, out)
        else:
            m.packed_weight = pack_weight(m.weight.detach(), out.view(torch.float32))
        offset += nbytes
    return added
