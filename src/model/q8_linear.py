"""The opt-in int8-activation CPU GEMM (`csrc/q8_gemm.cpp`), as llama.cpp computes quantized
weights: `SHARDLINE_CPU_ACTIVATIONS=int8`.

By default (`float32`) a weight of the integer-block form `w = d * q + m` per 32 inputs (GGUF's
Q4_0, Q4_1, Q8_0, Q4_K, Q5_K; model/packed_linear.py) is turned back into its exact float32
values inside the packed GEMM, so the results are those of the dequantized weights (transformers'
on the same GGUF). With `int8`, every row of the activations is quantized per block of 32 inputs
to int8 (scale amax / 127, round to nearest), the block products are exact int32 dot products
(AVX512-VNNI's vpdpbusd where the CPU has it, AVX2's maddubs, or plain C++), and one float step
per block applies the scales. The results are no longer float32's; the error is the rounding of
the activations to 8 bits, measured on the default model as perplexity on a fixed text
(tests/model/test_q8_linear.py, benchmarks/RESULTS.md). Q6_K's blocks, with a d per 16 inputs,
keep their two halves' dot products apart. Float weights keep the float32 path in either mode.

GGUF K-quants (`from_gguf`, from the file's blocks, no float copy of the weight made) keep the
file's integer sub-block scales and the super-block's float16 D and Dmin per 256 inputs, and
the kernel forms d = D * sc and m = -Dmin * mn per block (the same exact float32
products gguf-py's dequantize makes); Q5_K's fifth bit and Q6_K's top two are bit planes beside
the low nibbles, put back together in registers. Each part of a fused weight keeps its own form
(a Q4_K_M file's qkv with a Q6_K v: a form per 16-column group). Bytes per weight, the file's in
brackets: Q4_K 0.5625 (0.5625), Q5_K 0.6875 (0.6875), Q6_K 0.8203 (0.8203); before, with float32 d
and m per block of 32: 0.75, 1.25 and 1.375, and 1.375 for the Q4_K parts of a weight with any
Q6_K part (benchmarks/RESULTS.md section 28). A weight mixing K-quants with other types, or whose
parts are not on 16-row groups, still takes one common form with float32 scales (`pack`).
Q4_0 / Q4_1 / Q8_0 blocks (`pack`): nibbles 0.625 with float16 scales (their d and m are float16
values), bytes 1.125 (Q8_0). The layout is the kernel's own (q8_gemm.cpp's header comment), made
at load, every weight of a model into one huge-page buffer (`Q8Arena`: one-row GEMMs, which
stream the weights, take 12-16% less time than from ordinary pages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardline.model.env import env_choice
from shardline.model.memory import huge_page_zeros

ENV = "SHARDLINE_CPU_ACTIVATIONS"
MODES = ("auto", "float32", "int8")
GROUP = 16  # output columns per group (q8_gemm.cpp kCols)
SUPER_BLOCK = 256  # inputs per K-quant super-block
K_TYPES = {"Q4_K": 4, "Q5_K": 5, "Q6_K": 6}  # q8_kquant_new's type codes
HEADER = 64  # then per group its kind and offset (int64 each)
_SUPER_KINDS = {16: "Q4_K", 32: "Q5_K", 64: "Q6_K"}  # q8_gemm.cpp's kQ4K, kQ5K, kQ6K


def enabled() -> bool:
    """Whether integer-block weights take the int8-activation GEMM (`SHARDLINE_CPU_ACTIVATIONS`)."""
    return env_choice(ENV, MODES) == "int8"


@dataclass
class Q8Weight:
    """A linear weight in the int8-activation kernel's layout (`q8_pack`)."""

    packed: torch.Tensor
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def group_forms(self) -> list[str]:
        """Each 16-column group's form: "Q4_K", "Q5_K" or "Q6_K" (`from_gguf`), else "blocks"
        (`pack`)."""
        groups = int(self.packed[24:32].view(torch.int64))
        kinds = self.packed[HEADER : HEADER + 16 * groups].view(torch.int64)[::2].tolist()
        return [_SUPER_KINDS.get(kind, "blocks") for kind in kinds]

    @classmethod
    def pack(cls, d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor,
             d2: torch.Tensor | None = None) -> Q8Weight:
        """From integer blocks: `d`, `m` float `[N, K / 32]` (m None: 0) and q int8 `[N, K]`
        with w = d * q + m per block of 32 inputs; with `d2`, d holds for the block's first 16
        inputs and d2 for the others (Q6_K)."""
        d = d.float().contiguous()
        m = torch.zeros_like(d) if m is None else m.float().contiguous()
        d2 = None if d2 is None else d2.float().contiguous()
        packed = torch.ops.shardline.q8_pack(d, m, q.contiguous(), d2)
        return cls(packed, q.shape[0], q.shape[1])

    @staticmethod
    def gguf_layout(out_features: int, in_features: int, parts: Sequence[tuple[int, str, int]]) -> list[int] | None:
        """The K type code (`K_TYPES`) of each 16-column group of a weight of GGUF K-quant parts
        (first output row, type name, rows) in `from_gguf`'s forms; None for another type, K
        not whole super-blocks, rows past `out_features`, or a group holding rows of two types
        (parts of different types must meet on 16-row boundaries). Groups no part covers:
        Q4_K's form, zero scales."""
        if in_features % SUPER_BLOCK or not parts or any(name not in K_TYPES for _, name, _ in parts):
            return None
        per_group: list[int | None] = [None] * -(-out_features // GROUP)
        for first, name, rows in parts:
            if first < 0 or first + rows > out_features:
                return None
            for g in range(first // GROUP, -(-(first + rows) // GROUP)):
                if per_group[g] not in (None, K_TYPES[name]):
                    return None
                per_group[g] = K_TYPES[name]
        return [K_TYPES["Q4_K"] if t is None else t for t in per_group]

    @classmethod
    def from_gguf(cls, out_features: int, in_features: int, parts: Sequence[tuple[int, str, torch.Tensor]],
                  out: torch.Tensor | None = None) -> Q8Weight | None:
        """From GGUF K-quant blocks at about the file's size: `parts` (first output row, type
        name, the rows' blocks uint8 `[rows, row bytes]`), each of Q4_K, Q5_K or Q6_K, packed
        each in its own form (the kernel's super-block kinds, one per 16-column group), into
        `out` when given (zeroed uint8 of `gguf_nbytes` bytes); None where `gguf_layout` says
        None (the caller falls back to `pack`). Rows no part covers are 0. The rows are read
        from the blocks as they are: no float copy of the weight is made."""
        types = cls.gguf_layout(out_features, in_features, [(first, name, raw.shape[0]) for first, name, raw in parts])
        if types is None:
            return None
        if out is None:
            packed = torch.ops.shardline.q8_kquant_new(out_features, in_features, types)
        else:
            torch.ops.shardline.q8_kquant_init(out, out_features, in_features, types)
            packed = out
        for first, _, raw in parts:
            torch.ops.shardline.q8_kquant_fill(packed, first, raw)
        return cls(packed, out_features, in_features)

    @staticmethod
    def gguf_nbytes(out_features: int, in_features: int, types: list[int]) -> int:
        """The bytes of `from_gguf`'s weight of this `gguf_layout`."""
        return int(torch.ops.shardline.q8_kquant_nbytes(out_features, in_features, types))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W^T + bias` for a CPU float32 `x` `[..., in_features]`."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = flat.new_empty(flat.shape[0], self.out_features)
        torch.ops.shardline.q8_gemm(out, flat, self.packed, bias)
        return out.view(*x.shape[:-1], self.out_features)


class Q8Arena:
    """One huge-page buffer that a model's int8 weights are packed into, one after another (a
    decode step streams them all: 1-row GEMMs take 12-16% less time than from ordinary 4 KiB pages,
    benchmarks/RESULTS.md section 28). It is reserved at `bound` bytes, the most the weights can
    take (`bound_of`: their forms are known only once packed), but only the pages written are
    ever committed, so memory holds what the weights take."""

    ALIGN = 64

    def __init__(self, bound: int) -> None:
        self.buffer = huge_page_zeros((max(bound, self.ALIGN),), torch.uint8)
        self.used = 0

    @staticmethod
    def bound_of(out_features: int, in_features: int, kquant_types: list[int] | None = None) -> int:
        """The most bytes `pack` (or, with its `Q8Weight.gguf_layout`, `from_gguf`) takes."""
        if kquant_types is not None:
            size = Q8Weight.gguf_nbytes(out_features, in_features, kquant_types)
        elif in_features % 32 == 0 and out_features > 0:
            size = int(torch.ops.shardline.q8_pack_bound(out_features, in_features))
        else:
            return 0
        return -(-size // Q8Arena.ALIGN) * Q8Arena.ALIGN

    def _taken(self, packed: torch.Tensor) -> None:
        self.used += -(-packed.numel() // self.ALIGN) * self.ALIGN

    def pack(self, d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor,
             d2: torch.Tensor | None = None) -> Q8Weight:
        """`Q8Weight.pack`, into the buffer."""
        d = d.float().contiguous()
        m = torch.zeros_like(d) if m is None else m.float().contiguous()
        d2 = None if d2 is None else d2.float().contiguous()
        packed = torch.ops.shardline.q8_pack_into(self.buffer[self.used :], d, m, q.contiguous(), d2)
        self._taken(packed)
        return Q8Weight(packed, q.shape[0], q.shape[1])

    def from_gguf(self, out_features: int, in_features: int,
                  parts: Sequence[tuple[int, str, torch.Tensor]], types: list[int]) -> Q8Weight | None:
        """`Q8Weight.from_gguf` of this `gguf_layout`, into the buffer."""
        size = Q8Weight.gguf_nbytes(out_features, in_features, types)
        weight = Q8Weight.from_gguf(out_features, in_features, parts, out=self.buffer[self.used : self.used + size])
        if weight is not None:
            self._taken(weight.packed)
        return weight
