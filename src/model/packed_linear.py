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

Weights that are exactly `d * q + m` per 32 inputs of an output (q int8, d and m float16 values;
what GGUF's Q4_1, Q4_0 and Q8_0 dequantize to, so SmolLM2's every linear weight and its tied LM
head) are packed as integer blocks instead (`integer_blocks`, `pack_blocks`): per 32 x 32 block,
d and m as float16 and q as 4-bit nibbles where every q of the weight fits (640 bytes; Q4_1's
0..15, Q4_0's -8..7), else as int8 (1,152 bytes), instead of 4,096. The kernel turns them back
into float32 a slice at a time in L1 and runs the same tiles, so the results are the float32
panels' bit for bit, while a decode step, which streams every weight from memory, reads 3.6-6.4x
fewer bytes (SmolLM2: 95 MiB instead of 513). Every value is checked when packing; a weight of
any other form keeps float32 panels. A GGUF model's Q4_0/Q4_1/Q8_0 weights (the default model's)
are packed from the file's blocks directly (`pack_gguf_weights`: d, m and q read, not found
again), with no float32 copy made; `integer_blocks` serves float32 checkpoints whose weights are
such blocks dequantized (a GGUF converted by transformers).

GGUF's K-quants are such blocks too, with scales that are exact in float32 but not float16
values: Q4_K and Q5_K give w = (d * sc) * q - dmin * m per 32 inputs (d * sc and (d * sc) * q
exact, so d' * q + m' with d' = d * sc and m' = -(dmin * m) rounds once, as gguf-py does), Q6_K
(d * sc) * q per 16 (exact). They are packed from the file's super-blocks
(`gguf_scaled_blocks`, `pack_scaled_blocks`) into blocks with float32 scales: Q4_K as d, m and
nibbles (768 bytes per 1,024 weights; the file's 576), Q5_K with int8 q (1,280; 704), Q6_K as two
d per column, one per 16 inputs, and int8 q (1,280; 840), and a fused weight mixing Q6_K with
Q4_K (a Q4_K_M file's qkv where v has more bits) as two d, an m and int8 q (1,408). The results
are again the float32 panels' bit for bit. A 1B Q4_K_M file decodes one stream 2x faster so
than through `gguf_gemm`, holding ~1.5x the file's bytes (benchmarks/RESULTS.md section 25).
`SHARDLINE_CPU_GGUF_KQUANTS=gguf_gemm` leaves them in the file's blocks, run by `gguf_gemm` (as
are Q2_K, Q3_K, Q5_0, Q5_1, F16 and BF16 always).

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

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn

from shardline.model import paged_decode
from shardline.model.env import env_choice
from shardline.model.gguf_weights import GGUFLinearWeight, GGUFTensor
from shardline.model.memory import huge_page_zeros
from shardline.model.q8_linear import Q8Arena, Q8Weight
from shardline.model.q8_linear import enabled as int8_activations

logger = logging.getLogger(__name__)

ENV = "SHARDLINE_CPU_PACKED_LINEAR"
MODES = ("auto", "float32", "off")
# `gguf_gemm`: GGUF K-quant weights stay in the file's blocks, run by gguf_gemm, instead of
# integer panels with float32 scales (for comparing the two).
KQUANT_ENV = "SHARDLINE_CPU_GGUF_KQUANTS"
KQUANT_MODES = ("auto", "gguf_gemm")
PANEL = 32  # output columns per panel (csrc/cpu_gemm.cpp kNR)
BLOCK_K = 32  # inputs per integer block (kBlockK)
SCALE_BYTES = 2 * PANEL * 2  # d[32] and m[32] as float16
INT8_BLOCK_BYTES = SCALE_BYTES + BLOCK_K * PANEL  # then q[32][32] int8 (kInt8BlockBytes)
NIBBLE_BLOCK_BYTES = SCALE_BYTES + BLOCK_K * PANEL // 2  # then q as nibbles [16][32] (kNibbleBlockBytes)
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
    GGUF stores them, and every value is checked.

    A Q4_0 block often fits Q4_1's form too (m = -8 d, q + 8). When the blocks come out mixed,
    q spanning -8..15, they are found again with Q4_0's form tried first, so that q fits 4 bits
    (`block_layout`), if every block has it."""
    found = _integer_blocks(weight, symmetric_first=False)
    if found is not None and -8 <= int(found[2].min()) < 0 and int(found[2].max()) > 7:
        again = _integer_blocks(weight, symmetric_first=True)
        if again is not None and int(again[2].max()) <= 7:
            return again
    return found


def _integer_blocks(weight: torch.Tensor, symmetric_first: bool) -> IntegerBlocks | None:
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK_K:
        return None
    n, k = weight.shape
    d = torch.empty(n, k // BLOCK_K)
    m = torch.empty(n, k // BLOCK_K)
    q = torch.empty(n, k, dtype=torch.int8)
    for r0 in range(0, n, _DETECT_ROWS):
        rows = slice(r0, min(n, r0 + _DETECT_ROWS))
        found = _find_blocks(weight[rows].reshape(-1, BLOCK_K), symmetric_first)
        if found is None:
            return None
        count = rows.stop - rows.start
        d[rows], m[rows], q[rows] = (t.view(count, -1) for t in found)
    return d, m, q


def _find_blocks(blocks: torch.Tensor, symmetric_first: bool) -> IntegerBlocks | None:
    """d, m [B] and q [B, 32] for every row of `blocks` [B, 32] (see `integer_blocks`), or None
    when some row is none of the forms tried; `symmetric_first` tries Q4_0's form first."""
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

    def scaled(levels: int, sign: int, q_max: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        return sign * amax / levels, no_offset, -levels, q_max

    # (d, m, smallest q, largest q) for every block, the likeliest first: a pass over blocks
    # that fit an earlier candidate costs nothing. d and m must be float16 values (as GGUF
    # stores them; d * q is then exact in float32): blocks where they are not skip the pass.
    # Q4_0's q - 8 is -8..7 (d = -max / 8, the sign opposite to the block's largest value's):
    # with q up to 8, the other sign would fit too and its q would not fit signed nibbles.
    q4_0 = [scaled(levels, sign, 7) for levels in (8, 7) for sign in (1, -1)]
    candidates = [q4_1(0), scaled(127, 1, 127), q4_1(1), q4_1(-1), scaled(127, -1, 127)]
    candidates = q4_0 + candidates if symmetric_first else candidates + q4_0
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


def block_layout(blocks: IntegerBlocks) -> tuple[torch.dtype, int]:
    """(dtype, bytes per block) of the packed form of `integer_blocks`' `(d, m, q)`: unsigned
    nibbles (uint8, 640) when every q is in 0..15, signed ones (int8, 640) when in -8..7, else
    int8 q (uint8, 1,152); the kernel tells the forms apart by these."""
    q = blocks[2]
    low, high = (int(v) for v in torch.aminmax(q)) if q.numel() else (0, 0)
    if 0 <= low and high <= 15:
        return torch.uint8, NIBBLE_BLOCK_BYTES
    if -8 <= low and high <= 7:
        return torch.int8, NIBBLE_BLOCK_BYTES
    return torch.uint8, INT8_BLOCK_BYTES


def holds_integer_blocks(packed: torch.Tensor) -> bool:
    """Whether a packed weight is integer blocks (any `block_layout`) rather than float32 panels."""
    return packed.dtype in (torch.uint8, torch.int8)


def blocks_nbytes(blocks: IntegerBlocks) -> int:
    n, k = blocks[2].shape
    return -(-n // PANEL) * (k // BLOCK_K) * block_layout(blocks)[1]


def pack_blocks(blocks: IntegerBlocks, out: torch.Tensor | None = None) -> torch.Tensor:
    """`integer_blocks`' `(d, m, q)` of an `[N, K]` weight as the kernel's integer panels
    `[ceil(N / 32), K / 32, bytes]` of the dtype and size `block_layout` gives: per 32 x 32 block
    d[32] and m[32] (float16), then q[k][n] as int8 or as nibbles, byte [k / 2][n] holding
    q[k][n] (k even) in its low half and q[k + 1][n] in its high half. Written into `out` (a
    flat uint8 tensor of `blocks_nbytes` bytes) when given. Padding columns are 0."""
    d, m, q = blocks
    dtype, nbytes = block_layout(blocks)
    packed = _panels([d.half(), m.half()], q, nbytes == NIBBLE_BLOCK_BYTES).view(dtype)
    if out is None:
        return packed
    view = out.view(dtype).view(packed.shape)
    view.copy_(packed)
    return view


def _panels(scales: list[torch.Tensor], q: torch.Tensor, nibbles: bool) -> torch.Tensor:
    """Integer panels `[ceil(N / 32), K / 32, bytes]` (uint8) of q `[N, K]` and per-block scales
    `[N, K / 32]` (each stored as its dtype, one after the other, 32 columns each), q after
    them as int8 or as nibbles (`pack_blocks`). Padding columns are 0."""
    n, k = q.shape
    panels, kb = -(-n // PANEL), k // BLOCK_K

    def padded(t: torch.Tensor) -> torch.Tensor:
        full = t.new_zeros(panels * PANEL, *t.shape[1:])
        full[:n] = t
        return full

    def columns(t: torch.Tensor) -> torch.Tensor:  # [panels, kb, 32 columns], as bytes
        return padded(t).view(panels, PANEL, kb).transpose(1, 2).contiguous().view(torch.uint8)

    levels = padded(q).view(panels, PANEL, kb, BLOCK_K).permute(0, 2, 3, 1)  # [panels, kb, k, n]
    if nibbles:
        pairs = levels.reshape(panels, kb, BLOCK_K // 2, 2, PANEL).to(torch.int16) & 15
        levels = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).to(torch.uint8)
    return torch.cat([*(columns(t) for t in scales), levels.reshape(panels, kb, -1).view(torch.uint8)], dim=2)


GGUF_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # d * q + m per 32 values: integer blocks as they are


def gguf_integer_blocks(part: GGUFTensor) -> IntegerBlocks | None:
    """`(d, m, q)` of a Q4_0, Q4_1 or Q8_0 GGUF tensor read from its blocks (None for another
    type): `d * q + m` is gguf-py's dequantized value bit for bit (Q4_1: `d * q + m`, q 0..15;
    Q4_0: `d * (q - 8)`, m = -0.0; Q8_0: `d * q`, m = -0.0; d * q is exact in float32)."""
    if part.type not in GGUF_BLOCK_TYPES or part.shape[1] % BLOCK_K:
        return None
    n, k = part.shape
    nbytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[part.type]
    raw = part.data.unflatten(1, (k // BLOCK_K, nbytes))  # [N, blocks, bytes], rows may be strided

    def half(at: int) -> torch.Tensor:
        return raw[:, :, at : at + 2].contiguous().view(torch.float16).squeeze(-1).float()

    d = half(0)
    if part.type == "Q8_0":
        return d, torch.full_like(d, -0.0), raw[:, :, 2:].contiguous().view(torch.int8).reshape(n, k)
    first = 4 if part.type == "Q4_1" else 2
    nibbles = raw[:, :, first : first + BLOCK_K // 2]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=2).to(torch.int8)  # ggml: low halves first
    if part.type == "Q4_1":
        return d, half(2), q.reshape(n, k)
    return d, torch.full_like(d, -0.0), (q - 8).reshape(n, k)


def _weight_integer_blocks(weight: GGUFLinearWeight) -> IntegerBlocks | None:
    """A GGUF linear weight's parts as one `(d, m, q)` over its output rows (rows no part
    covers, an LM head's padding, are 0), or None unless every part is of GGUF_BLOCK_TYPES."""
    found = [(first, gguf_integer_blocks(part)) for first, part in weight.parts]
    if not found or any(blocks is None for _, blocks in found) or weight.in_features % BLOCK_K:
        return None
    n, k = weight.out_features, weight.in_features
    d, m = torch.zeros(n, k // BLOCK_K), torch.zeros(n, k // BLOCK_K)
    q = torch.zeros(n, k, dtype=torch.int8)
    for first, blocks in found:
        assert blocks is not None
        rows = slice(first, first + blocks[2].shape[0])
        d[rows], m[rows], q[rows] = blocks
    return d, m, q


# K-quants: per 32 inputs of an output, w = d * q + m with d = d_super * sc, exact in float32 but
# not a float16 value, so these blocks keep float32 scales (`ScaledBlocks`, `pack_scaled_blocks`).
GGUF_K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
F32_SCALE_BYTES = 2 * PANEL * 4  # d[32] and m[32] (or d[32] and d2[32]) as float32
NIBBLE_F32_BLOCK_BYTES = F32_SCALE_BYTES + BLOCK_K * PANEL // 2  # 768 (kNibbleF32BlockBytes)
INT8_F32_BLOCK_BYTES = F32_SCALE_BYTES + BLOCK_K * PANEL  # 1,280 (kInt8F32BlockBytes)
INT8_HALVES_M_BLOCK_BYTES = INT8_F32_BLOCK_BYTES + PANEL * 4  # 1,408 (kInt8HalvesMBlockBytes)
_K_ROWS = 2048  # K-quant rows decoded at a time

# (d, d2, m, q): d, d2, m float32 [N, K / 32], q int8 [N, K]; w[n, k] = d' * q[n, k] + m' with
# d' = d for k % 32 < 16 and d2 (when not None) for the rest, m' = m (-0.0 when None).
ScaledBlocks = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's eight 6-bit scales and mins from their 12 bytes `[..., 12]` (ggml's
    get_scale_min_k4): `[..., 8]` each, as float32."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode_k_rows(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of Q4_K / Q5_K / Q6_K super-blocks `[rows, supers, bytes]` as `(d, second, q)` per 32
    inputs: `[rows, K / 32]` float32 twice and int8 q `[rows, K]`, computed as gguf-py's
    `dequantize` does (d_super * sc and dmin * m in float32, both exact). Q4_K / Q5_K: w = d * q
    - second (dmin * m); Q6_K: w = d * q for a block's first 16 inputs, second * q for the rest."""
    rows, supers, _ = raw.shape
    f16 = np.dtype(np.float16)
    if type_name == "Q6_K":
        ql, qh = raw[..., :128], raw[..., 128:192]
        sc = raw[..., 192:208].view(np.int8).astype(np.float32)  # [rows, supers, 16]
        d = raw[..., 208:210].copy().view(f16).astype(np.float32)  # [rows, supers, 1]
        dl = (d * sc).reshape(rows, supers, 8, 2)
        low = (ql.reshape(rows, supers, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15
        high = (qh.reshape(rows, supers, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
        q = (low.reshape(rows, supers, 8, 32) | (high.reshape(rows, supers, 8, 32) << 4)).astype(np.int8) - 32
        return dl[..., 0].reshape(rows, -1), dl[..., 1].reshape(rows, -1), q.reshape(rows, -1)
    d = raw[..., 0:2].copy().view(f16).astype(np.float32)
    dmin = raw[..., 2:4].copy().view(f16).astype(np.float32)
    sc, mn = _k_scale_min(raw[..., 4:16])
    qs = raw[..., 16:144] if type_name == "Q4_K" else raw[..., 48:176]
    q = (qs.reshape(rows, supers, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15
    q = q.reshape(rows, supers, 8, 32)
    if type_name == "Q5_K":
        qh = raw[..., 16:48].reshape(rows, supers, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        q = q | ((qh & 1) << 4)
    return (d * sc).reshape(rows, -1), (dmin * mn).reshape(rows, -1), q.astype(np.int8).reshape(rows, -1)


def gguf_scaled_blocks(part: GGUFTensor) -> ScaledBlocks | None:
    """`ScaledBlocks` of a GGUF tensor of GGUF_K_TYPES or GGUF_BLOCK_TYPES (None for another
    type, or K not whole blocks): w = d' * q + m' is gguf-py's dequantized value bit for bit
    (Q4_K / Q5_K: (d * sc) * q - dmin * m, with (d * sc) * q exact in float32, so one rounding
    either way; Q6_K: (d * sc) * q, exact)."""
    if part.type in GGUF_BLOCK_TYPES:
        blocks = gguf_integer_blocks(part)
        if blocks is None:
            return None
        d, m, q = blocks
        return d, None, None if part.type != "Q4_1" else m, q
    if part.type not in GGUF_K_TYPES or part.shape[1] % 256:
        return None
    n, k = part.shape
    nbytes = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[part.type]
    d = torch.empty(n, k // BLOCK_K)
    second = torch.empty(n, k // BLOCK_K)
    q = torch.empty(n, k, dtype=torch.int8)
    for r0 in range(0, n, _K_ROWS):
        r1 = min(n, r0 + _K_ROWS)
        raw = part.data[r0:r1].numpy().reshape(r1 - r0, k // 256, nbytes)
        dr, sr, qr = _decode_k_rows(raw, part.type)
        d[r0:r1], second[r0:r1], q[r0:r1] = torch.from_numpy(dr), torch.from_numpy(sr), torch.from_numpy(qr)
    if part.type == "Q6_K":
        return d, second, None, q
    return d, None, second.neg_(), q  # w = d * q + (-(dmin * m)): the same one rounding


def scaled_layout(blocks: ScaledBlocks, nibbles: bool | None = None) -> tuple[torch.dtype, int]:
    """(dtype, bytes per block) of `ScaledBlocks`' packed form: one d and an m with every q in
    0..15 as unsigned nibbles (uint8, 768; Q4_K), else int8 q (uint8, 1,280; Q5_K); two d and
    no m (int8, 1,280; Q6_K); two d and an m (uint8, 1,408; a fused weight mixing Q6_K with
    types that have an m). `nibbles` given: whether q is packed as nibbles where the form has
    one d (it must fit), instead of what every q's range says."""
    _, d2, m, q = blocks
    if d2 is None and nibbles is None:
        low, high = (int(v) for v in torch.aminmax(q)) if q.numel() else (0, 0)
        nibbles = 0 <= low and high <= 15
    return _layout(d2 is not None, m is not None or d2 is None, bool(nibbles))


def _layout(two_d: bool, has_m: bool, nibbles: bool) -> tuple[torch.dtype, int]:
    if two_d:
        return (torch.uint8, INT8_HALVES_M_BLOCK_BYTES) if has_m else (torch.int8, INT8_F32_BLOCK_BYTES)
    return (torch.uint8, NIBBLE_F32_BLOCK_BYTES) if nibbles else (torch.uint8, INT8_F32_BLOCK_BYTES)


def pack_scaled_blocks(blocks: ScaledBlocks, nibbles: bool | None = None) -> torch.Tensor:
    """`ScaledBlocks` of an `[N, K]` weight as the kernel's integer panels `[ceil(N / 32), K / 32,
    bytes]` (`scaled_layout`): per 32 x 32 block, float32 d[32], d2[32] where there is one, m[32]
    where the form has one (with one d, m is always there: -0.0 for none), then q as int8 or
    nibbles, as `pack_blocks` lays them out. Padding columns are 0."""
    d, d2, m, q = blocks
    dtype, nbytes = scaled_layout(blocks, nibbles)
    if d2 is None and m is None:
        m = torch.full_like(d, -0.0)
    scales = [t.float() for t in (d, d2, m) if t is not None]
    packed = _panels(scales, q, nbytes == NIBBLE_F32_BLOCK_BYTES)
    assert packed.shape[2] == nbytes
    return packed.view(dtype)


def _scaled_form(weight: GGUFLinearWeight) -> tuple[bool, bool, bool] | None:
    """(two d, an m, nibbles): the packed form of a GGUF weight with some part of GGUF_K_TYPES
    and every part of those or GGUF_BLOCK_TYPES, from its parts' types (Q6_K has two d; Q4_K,
    Q5_K and Q4_1 an m; q fits unsigned nibbles when every part is Q4_K or Q4_1); None for
    another weight."""
    types = {part.type for _, part in weight.parts}
    if not types & set(GGUF_K_TYPES) or not types <= {*GGUF_K_TYPES, *GGUF_BLOCK_TYPES} \
            or weight.in_features % 256:
        return None
    two_d = "Q6_K" in types
    return two_d, bool(types & {"Q4_K", "Q5_K", "Q4_1"}), not two_d and types <= {"Q4_K", "Q4_1"}


def _weight_scaled_blocks(weight: GGUFLinearWeight, start: int = 0, stop: int | None = None) -> ScaledBlocks | None:
    """Output rows `[start, stop)` (all by default) of a GGUF linear weight as one
    `ScaledBlocks` (rows no part covers are 0), with a d2 and an m as `_scaled_form` says (a
    part without a second d takes d as it; without an m, -0.0), or None where it says None."""
    form = _scaled_form(weight)
    if form is None:
        return None
    two_d, has_m, _ = form
    stop = weight.out_features if stop is None else stop
    n, k = stop - start, weight.in_features
    d = torch.zeros(n, k // BLOCK_K)
    d2 = torch.zeros(n, k // BLOCK_K) if two_d else None
    m = torch.zeros(n, k // BLOCK_K) if has_m else None
    q = torch.zeros(n, k, dtype=torch.int8)
    for first, part in weight.parts:
        lo, hi = max(start, first), min(stop, first + part.shape[0])
        if lo >= hi:
            continue
        blocks = gguf_scaled_blocks(part.narrow(0, lo - first, hi - lo))
        assert blocks is not None
        bd, bd2, bm, bq = blocks
        rows = slice(lo - start, hi - start)
        d[rows], q[rows] = bd, bq
        if d2 is not None:
            d2[rows] = bd if bd2 is None else bd2
        if m is not None:
            m[rows] = -0.0 if bm is None else bm
    return d, d2, m, q


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of .gguf files (/proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[-1].endswith(".gguf"):
                    start, end = (int(v, 16) for v in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def release_gguf_pages() -> int:
    """Let the kernel drop every resident page of this process's .gguf file mappings; returns
    the bytes of the ranges advised. Loading reads through them (the header, each norm, the
    blocks packing turns into panels; the kernel maps file pages in large runs, 55 MiB for
    SmolLM2's 61 norms), but they are private, never-written mappings of the file: a later read
    faults a page in from the file again (the embedding's rows as prompts use them), while RSS
    stops counting what is no longer used."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    advised = 0
    for start, end in _file_mappings():
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0:  # MADV_DONTNEED
            advised += end - start
    return advised


def pack_gguf_weights(model: nn.Module) -> int:
    """Turn every GGUF linear weight (`GGUFLinearWeight`) whose parts are all Q4_0, Q4_1 or
    Q8_0 into the packed decode GEMM's integer panels, read straight from the file's blocks
    (`gguf_integer_blocks`; the same values, so the same results bit for bit as the float32
    weights would give), in one huge-page buffer; and, unless `SHARDLINE_CPU_GGUF_KQUANTS` is
    `gguf_gemm`, those with Q4_K, Q5_K or Q6_K parts (and the others of those types) into
    integer panels with float32 scales (`gguf_scaled_blocks`). For these types the packed kernel decodes
    3-4x faster than `gguf_gemm` (benchmarks/RESULTS.md section 17), at the same size (Q4_x:
    640 bytes per 1,024 weights either way; Q8_0 1,152 instead of 1,088); `load_packed_model`
    then lets go of the file pages packing read (`release_gguf_pages`). With
    `SHARDLINE_CPU_ACTIVATIONS=int8` they take the int8-activation kernel's layout instead
    (`q8_linear`; K-quants at about the file's size), in one huge-page buffer (`Q8Arena`).
    Returns the bytes of the panels (0 in modes other than `auto`)."""
    if env_choice(ENV, MODES) != "auto" or not paged_decode.KERNEL.load():
        return 0
    kquants = env_choice(KQUANT_ENV, KQUANT_MODES) == "auto"
    # (module, weight, its panels already packed or None, form, dtype, shape): K-quant weights
    # are packed straight into the buffer, _K_ROWS output rows at a time, so that what start-up
    # holds on top of the panels is one such slice's decoding (CPU workers keep freed heap
    # memory mapped: a whole weight's q and its packed copy would stay in RSS).
    Plan = tuple[Any, GGUFLinearWeight, torch.Tensor | None, Any, torch.dtype, tuple[int, int, int]]
    plans: list[Plan] = []
    int8_bytes = 0
    weights = [(m, w) for m in model.modules() if isinstance(w := getattr(m, "packed_weight", None), GGUFLinearWeight)]
    # SHARDLINE_CPU_ACTIVATIONS=int8: the int8-activation kernel's own layout, in one buffer
    arena = Q8Arena(sum(Q8Arena.bound_of(w.out_features, w.in_features, _q8_kquant_layout(w, kquants))
                        for _, w in weights)) if int8_activations() else None
    for m, weight in weights:
        blocks = _weight_integer_blocks(weight)
        if arena is not None:
            q8 = _q8_weight(weight, blocks, kquants, arena)
            if q8 is not None:
                setattr(m, "packed_weight", q8)  # noqa: B010 (a module attribute, not a tensor)
                int8_bytes += q8.nbytes
                continue
        if blocks is not None:
            ready = pack_blocks(blocks)
            plans.append((m, weight, ready, None, ready.dtype, tuple(ready.shape)))  # type: ignore[arg-type]
            continue
        form = _scaled_form(weight) if kquants else None
        if form is not None:
            dtype, nbytes = _layout(*form)
            shape = (-(-weight.out_features // PANEL), weight.in_features // BLOCK_K, nbytes)
            plans.append((m, weight, None, form, dtype, shape))
    sizes = [shape[0] * shape[1] * shape[2] for *_, shape in plans]
    added = sum(sizes)
    if not plans:
        return int8_bytes
    buffer = huge_page_zeros((added,), torch.uint8)
    offset = 0
    for (m, weight, prepacked, form, dtype, shape), size in zip(plans, sizes, strict=True):
        view = buffer[offset : offset + size].view(dtype).view(shape)
        if prepacked is not None:
            view.copy_(prepacked)
        else:
            for r0 in range(0, weight.out_features, _K_ROWS):
                r1 = min(weight.out_features, r0 + _K_ROWS)
                scaled = _weight_scaled_blocks(weight, r0, r1)
                assert scaled is not None
                view[r0 // PANEL : -(-r1 // PANEL)].copy_(pack_scaled_blocks(scaled, form[2]))
        m.packed_weight = view
        offset += size
    return added + int8_bytes


def _q8_kquant_layout(weight: GGUFLinearWeight, kquants: bool) -> list[int] | None:
    """`Q8Weight.gguf_layout` of a GGUF weight (None with K-quants left to gguf_gemm)."""
    if not kquants:
        return None
    return Q8Weight.gguf_layout(weight.out_features, weight.in_features,
                                [(first, part.type, part.shape[0]) for first, part in weight.parts])


def _q8_weight(weight: GGUFLinearWeight, blocks: IntegerBlocks | None, kquants: bool,
               arena: Q8Arena | None = None) -> Q8Weight | None:
    """A GGUF weight for the int8-activation kernel, packed into `arena` when given: Q4_0/Q4_1/
    Q8_0 blocks, or K-quant ones. Q4_K / Q5_K / Q6_K parts go in at about the file's size
    (`Q8Weight.from_gguf`: each part in its own form, read from the file's blocks, no float copy
    made); a weight mixing them with other types, or with two types inside a 16-row group,
    takes one common form with float32 scales (Q6_K's d per 16 inputs kept), from the whole
    weight's d, m and q."""
    pack = Q8Weight.pack if arena is None else arena.pack
    if blocks is not None:
        return pack(*blocks)
    types = _q8_kquant_layout(weight, kquants)
    if types is not None:
        parts = [(first, part.type, part.data) for first, part in weight.parts]
        if arena is None:
            return Q8Weight.from_gguf(weight.out_features, weight.in_features, parts)
        return arena.from_gguf(weight.out_features, weight.in_features, parts, types)
    if not kquants or _scaled_form(weight) is None:
        return None
    scaled = _weight_scaled_blocks(weight)
    assert scaled is not None
    d, d2, m, q = scaled
    return pack(d, m, q, d2)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: Any) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the packed copy of `weight` when there is one.

    Up to MAX_ROWS rows take the kernel at once. Longer inputs (prefill chunks) keep F.linear
    while the float32 weight is there; once `drop_float32_weights` has replaced it by its shape
    alone (a meta tensor), they run through the kernel MAX_ROWS rows at a time. A GGUF weight
    (`gguf_weights.GGUFLinearWeight`) and an int8-activation one (`q8_linear.Q8Weight`) run
    their own kernels for any number of rows."""
    if isinstance(packed, Q8Weight) and x.dtype == torch.float32 and x.device.type == "cpu":
        return packed.matmul(x, bias)
    if isinstance(packed, GGUFLinearWeight) and x.dtype == torch.float32 and x.device.type == "cpu":
        if x.dim() != 2:
            flat = packed.matmul(x.reshape(-1, x.shape[-1]), bias)
            return flat.view(*x.shape[:-1], flat.shape[-1])
        return packed.matmul(x, bias)
    if packed is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if x.dim() != 2:
        flat = linear(x.reshape(-1, x.shape[-1]), weight, bias, packed)
        return flat.view(*x.shape[:-1], flat.shape[-1])
    rows = x.shape[0]
    if rows > MAX_ROWS and not weight.is_meta:
        return F.linear(x, weight, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty(rows, weight.shape[0])
    for start in range(0, rows, MAX_ROWS):
        stop = min(rows, start + MAX_ROWS)
        torch.ops.shardline.packed_gemm(out[start:stop], x[start:stop], packed, bias)
    return out


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (a tied LM head's weight)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def drop_float32_weights(model: nn.Module) -> int:
    """Replace the float32 weight of every packed layer by a meta tensor of its shape (the
    packed copy then serves every input size); returns the bytes let go. A weight shared with
    another module (a tied LM head's, which is the embedding) stays."""
    shared = shared_parameter_ids(model)
    freed = 0
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if getattr(m, "packed_weight", None) is None or not isinstance(weight, nn.Parameter) \
                or weight.is_meta or id(weight) in shared:
            continue
        freed += weight.numel() * weight.element_size()
        m.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                requires_grad=False)
    return freed


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
    limit = MAX_MEMORY_FRACTION * psutil.virtual_memory().total
    # A weight's integer blocks are packed as soon as they are found, so what start-up holds on
    # top of the copy is that packed form (0.6-1.1 bytes a weight) and not d, m and q for every
    # layer (1.25 bytes a weight); float32 panels go straight into the buffer. Detection stops
    # once the copy would pass the limit.
    plans: list[tuple[Any, torch.Tensor | None, int]] = []
    added = int8_bytes = 0
    # the int8-activation kernel's own layout, in one buffer (only what is packed is committed)
    arena = Q8Arena(sum(Q8Arena.bound_of(*m.weight.shape) for m in layers)) \
        if int8_activations() and mode == "auto" else None
    for m in layers:
        blocks = integer_blocks(m.weight.detach()) if mode == "auto" else None
        if arena is not None and blocks is not None:
            m.packed_weight = arena.pack(*blocks)
            int8_bytes += m.packed_weight.nbytes
            continue
        packed = pack_blocks(blocks) if blocks is not None else None
        del blocks
        nbytes = packed.numel() if packed is not None else packed_numel(m.weight) * 4
        added += nbytes
        if added > limit:
            partial = len(plans) + 1 < len(layers)  # not every weight looked at yet
            logger.info("not packing linear weights: the copy (%s%.0f MiB) would exceed %.0f%% of RAM",
                        "over " if partial else "", added / 2**20, 100 * MAX_MEMORY_FRACTION)
            return 0
        plans.append((m, packed, nbytes))
    buffer = huge_page_zeros((added,), torch.uint8)  # one allocation for all, in huge pages
    offset = 0
    for i, (m, packed, nbytes) in enumerate(plans):
        out = buffer[offset : offset + nbytes]
        if packed is not None:
            m.packed_weight = out.view(packed.dtype).view(packed.shape)
            m.packed_weight.copy_(packed)
            plans[i] = (m, None, nbytes)  # the standalone blocks go
        else:
            m.packed_weight = pack_weight(m.weight.detach(), out.view(torch.float32))
        offset += nbytes
    return added + int8_bytes


def load_packed_model(model_config: Any, parallel_context: Any) -> tuple[nn.Module, dict[str, Any]]:
    """`loader.load_model` for a CPU float32 rank, with its linear weights packed and their
    float32 copies let go, and its token embedding mapped from the checkpoint
    (`loader.map_embedding`); returns the model and what happened, for the start-up log:
    `{"packed": bytes, "freed": bytes, "cached": bool, "blocks": n, "weights": n, "mapped": bytes,
    "gguf_layers": n, "gguf_bytes": bytes, "int8_layers": n}` (int8_layers: layers on the
    int8-activation GEMM, `q8_linear`).

    The packed bytes come from `model.packed_cache` when an entry for this rank exists (the
    float32 weights of those layers are then never read); otherwise the weights load, are
    packed, and the entry is written for the next start."""
    from shardline.model.loader import load_model, map_embedding
    from shardline.model.packed_cache import PackedCache

    info: dict[str, Any] = {"packed": 0, "freed": 0, "cached": False, "blocks": 0, "weights": 0, "mapped": 0}
    mode = env_choice(ENV, MODES)
    kquants = env_choice(KQUANT_ENV, KQUANT_MODES)  # refused here when not one of them
    usable = (mode != "off" and parallel_context.device.type == "cpu"
              and model_config.dtype == torch.float32)
    if usable:
        paged_decode.check_spin_setting()
        usable = paged_decode.KERNEL.load()  # logs why, once, where it cannot build
    cache = index = None
    if usable and not int8_activations():  # (the int8 layout is packed at every start)
        cache = PackedCache.for_rank(
            model_config.path, architecture=model_config.architecture, dtype=model_config.dtype,
            tp=(parallel_context.tp_rank, parallel_context.tp_size),
            pp=(parallel_context.pp_rank, parallel_context.pp_size),
            mode=mode if kquants == "auto" else f"{mode}/kquants={kquants}")
        index = cache.lookup() if cache is not None else None
    # A GGUF model's weights are views of the file, never read unless used: nothing to skip.
    skip = PackedCache.weight_names(index) if index is not None and not model_config.gguf_file else set()
    model = load_model(model_config, parallel_context, skip_weights=skip)
    if cache is not None and index is not None:
        loaded = cache.load(model, index)
        if loaded is not None:
            info.update(packed=loaded, cached=True)
        elif skip:  # the entry did not fit after all: load the skipped weights too
            model = load_model(model_config, parallel_context)
    if usable and not info["cached"]:
        # GGUF: Q4_0/Q4_1/Q8_0 blocks straight into integer panels; else float32 weights packed
        packer = pack_gguf_weights if model_config.gguf_file else pack_linear_weights
        info["packed"] = packer(model)
        if info["packed"] and cache is not None:
            cache.save(model)
    if usable:
        info["mapped"] = map_embedding(model, model_config, parallel_context)
    if model_config.gguf_file and parallel_context.device.type == "cpu":
        release_gguf_pages()  # what loading read through the mapping; used pages come back
    gguf = [w for m in model.modules() if isinstance(w := getattr(m, "packed_weight", None), GGUFLinearWeight)]
    tables = [t for m in model.modules() if (t := getattr(m, "gguf_weight", None)) is not None]
    blocks = {id(t.data): t.nbytes for w in gguf for _, t in w.parts} | {id(t.data): t.nbytes for t in tables}
    info["gguf_layers"] = len(gguf)
    info["gguf_bytes"] = sum(blocks.values())  # a tied head's table once
    info["int8_layers"] = sum(isinstance(getattr(m, "packed_weight", None), Q8Weight) for m in model.modules())
    if info["packed"]:
        weights = [w for m in model.modules() if isinstance(w := getattr(m, "packed_weight", None), torch.Tensor)]
        info["weights"] = len(weights)
        info["blocks"] = sum(holds_integer_blocks(w) for w in weights)
        info["freed"] = drop_float32_weights(model)
    return model, info
