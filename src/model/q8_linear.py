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

Bytes per weight: nibbles 0.625 with float16 scales (Q4_0, Q4_1: d and m are float16 values) or
0.75 with float32 ones (Q4_K), bytes 1.125 / 1.25 (Q8_0 / Q5_K). The layout is the kernel's own
(`q8_pack`), made at load from the integer blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardline.model.env import env_choice

ENV = "SHARDLINE_CPU_ACTIVATIONS"
MODES = ("auto", "float32", "int8")


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

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W^T + bias` for a CPU float32 `x` `[..., in_features]`."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = flat.new_empty(flat.shape[0], self.out_features)
        torch.ops.shardline.q8_gemm(out, flat, self.packed, bias)
        return out.view(*x.shape[:-1], self.out_features)
