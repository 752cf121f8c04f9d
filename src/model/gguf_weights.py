"""GGUF weights kept as they are in the file, and the CPU GEMM that runs them (`csrc/gguf_gemm.cpp`).

`loader.iter_gguf` hands every 2-D GGUF tensor to the model as a `GGUFTensor`: its rows' bytes in
ggml's block format, a view of a copy-on-write memory mapping of the file (gguf-py's
`GGUFReader`), nothing read until used. A CPU float32 linear layer keeps the view (its rank's
rows; for a row-parallel layer, whole blocks of its columns) as a `GGUFLinearWeight` and
multiplies by it with `shardline::gguf_gemm`, which turns a group of rows into float32 at a time
with exactly the values gguf-py's `dequantize` gives, so transformers loading the same file
stays the reference. The float32 weight is never made: memory holds the file's bytes, paged in
from the page cache. Elsewhere (CUDA, other dtypes, a machine where the kernels do not build)
the tensor is dequantized once at load to the model's dtype (`GGUFTensor.materialize`).

A type without a kernel is refused at load, naming it and the types there are kernels for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shardline.model.errors import CheckpointError
from shardline.model.gguf_reader import gguf_files as gguf_files  # re-exported

# ggml type name -> (ggml type number, values per block, bytes per block).
TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "BF16": (30, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}
_BY_NUMBER = {number: name for name, (number, _, _) in TYPES.items()}
# The kernel takes plain types 32 values at a time.
_KERNEL_BLOCK = {name: max(32, block) for name, (_, block, _) in TYPES.items()}


def supported_types() -> str:
    return ", ".join(TYPES)


def type_name(number: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(number).name
    except (ImportError, ValueError):
        return f"ggml type {number}"


class GGUFTensor:
    """One GGUF weight `[N, K]` as its rows of blocks: `data` is uint8 `[N, row_bytes]` (rows
    may be further apart than `row_bytes`: a block-aligned column shard of a wider tensor)."""

    def __init__(
        self, name: str, type_number: int, shape: tuple[int, int], data: torch.Tensor
    ) -> None:
        if type_number not in _BY_NUMBER:
            raise CheckpointError(
                f"GGUF tensor {name!r} is {type_name(type_number)}, which shardline has no kernel "
                f"for; supported types: {supported_types()}"
            )
        self.name = name
        self.type_number = type_number
        self.type = _BY_NUMBER[type_number]
        self.shape = shape
        self.data = data

    @property
    def block(self) -> int:
        return TYPES[self.type][1]

    @property
    def nbytes(self) -> int:
        return int(self.data.shape[0] * self.data.shape[1])

    def narrow(self, dim: int, start: int, length: int) -> GGUFTensor:
        """Rows `[start, start + length)` (dim 0), or columns (dim 1) on whole blocks."""
        from shardline.model.parallel.utils import ShardShapeError

        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ShardShapeError(
                f"cannot take [{start}:{start + length}] along dim {dim} of tensor "
                f"{self.name!r} of shape {list(self.shape)}"
            )
        if dim == 0:
            return GGUFTensor(
                self.name,
                self.type_number,
                (length, self.shape[1]),
                self.data[start : start + length],
            )
        _, block, nbytes = TYPES[self.type]
        if start % block or length % block:
            raise ShardShapeError(
                f"{self.name!r} is {self.type} with blocks of {block} input columns: its {self.shape[1]} "
                f"columns cannot be split into shards of {length} (tensor_parallel_size="
                f"{self.shape[1] // max(1, length)}) on whole blocks"
            )
        return GGUFTensor(
            self.name,
            self.type_number,
            (self.shape[0], length),
            self.data[:, start // block * nbytes : (start + length) // block * nbytes],
        )

    def kernel_ok(self) -> bool:
        """Whether `gguf_gemm` takes this tensor (whole kernel blocks along K)."""
        return self.shape[1] % _KERNEL_BLOCK[self.type] == 0

    def materialize(self) -> torch.Tensor:
        """The float32 values (gguf-py's `dequantize`)."""
        # The C++ dequantizer only where the CPU kernels are on (with them off, as on a machine
        # without a compiler, the extension is never loaded: gguf-py's numpy dequantize instead).
        if self.kernel_ok() and self.data.numel() and cpu_kernels_on():
            out = torch.empty(self.shape, dtype=torch.float32)
            torch.ops.shardline.gguf_dequantize(out, self.data, self.type_number)
            return out
        import gguf

        raw = np.ascontiguousarray(self.data.numpy())
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(self.type_number))
        return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(self.shape))

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, {self.type}, shape={list(self.shape)})"


def read_rows(
    path: str,
    name: str,
    type_number: int,
    shape: tuple[int, int],
    offset: int,
    order: np.ndarray | None = None,
) -> GGUFTensor:
    """A tensor's rows read into memory (not through the mapping, so its pages are not held
    twice), reordered by `order` when given (llama.cpp's q/k row permutation undone)."""
    info = TYPES.get(_BY_NUMBER.get(type_number, ""))
    if info is None:
        GGUFTensor(name, type_number, shape, torch.empty(0, 0, dtype=torch.uint8))  # raises
        raise AssertionError("unreachable")
    row_bytes = shape[1] // info[1] * info[2]
    raw = np.empty((shape[0], row_bytes), dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(raw).cast("B")  # type: ignore[arg-type]
        got = os.preadv(f.fileno(), [view], offset)
    if got != raw.nbytes:
        raise CheckpointError(f"GGUF tensor {name!r} in {path!r} is truncated")
    if order is not None:
        raw = raw[order]
    return GGUFTensor(name, type_number, shape, torch.from_numpy(raw))


@dataclass
class GGUFLinearWeight:
    """A linear layer's weight as GGUF parts: `(first output row, GGUFTensor)`, which together
    cover the layer's `out_features` rows (a fused qkv or gate/up layer has one part per
    projection, each of its own type)."""

    out_features: int
    in_features: int
    parts: list[tuple[int, GGUFTensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.parts)

    def covered(self) -> int:
        return sum(t.shape[0] for _, t in self.parts)

    def complete(self) -> bool:
        return self.covered() == self.out_features

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W^T + bias` for a CPU float32 `x` `[rows, in_features]`."""
        if x.stride(-1) != 1 or (x.dim() == 2 and x.stride(0) != x.shape[1]):
            x = x.contiguous()
        rows_out = (x.shape[0], self.out_features)
        out = x.new_empty(rows_out) if self.complete() else x.new_zeros(rows_out)
        for first, part in self.parts:
            rows = part.shape[0]
            torch.ops.shardline.gguf_gemm(
                out[:, first : first + rows],
                x,
                part.data,
                part.type_number,
                None if bias is None else bias[first : first + rows],
            )
        return out


def gguf_layer_ok(param: torch.Tensor, loaded: Any) -> bool:
    """Whether a layer keeps `loaded` in its GGUF form: a CPU float32 layer, a tensor the kernel
    takes, and the kernels build (else it is dequantized at load)."""
    return (
        isinstance(loaded, GGUFTensor)
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and loaded.kernel_ok()
        and cpu_kernels_on()
    )


def cpu_kernels_on() -> bool:
    """Whether the GGUF kernels may run: the CPU linear kernels are not switched off
    (`SHARDLINE_CPU_PACKED_LINEAR`) and the extension builds (loading it when it does)."""
    from shardline.model import paged_decode
    from shardline.model.env import env_choice
    from shardline.model.packed_linear import ENV, MODES

    return env_choice(ENV, MODES) != "off" and paged_decode.KERNEL.load()


def add_part(layer: Any, param: torch.Tensor, first_row: int, part: GGUFTensor) -> None:
    """Record `part` as rows `[first_row, ...)` of `layer`'s GGUF weight."""
    weight = getattr(layer, "packed_weight", None)
    if not isinstance(weight, GGUFLinearWeight):
        weight = GGUFLinearWeight(int(param.shape[0]), int(param.shape[1]), [])
        layer.packed_weight = weight
    if part.shape[1] != weight.in_features:
        from shardline.model.parallel.utils import ShardShapeError

        raise ShardShapeError(f"expected {weight.in_features} input columns, got {part.shape[1]}")
    weight.parts = [p for p in weight.parts if p[0] != first_row] + [(first_row, part)]


def drop_dense_weights(model: torch.nn.Module) -> int:
    """Replace the (never filled) float32 weight of every layer that holds a complete GGUF
    weight by a meta tensor of its shape; returns how many layers hold GGUF weights. A layer
    whose parts do not cover it (some projection came dequantized) dequantizes its parts into
    the float32 weight instead."""
    from torch import nn

    count = 0
    modules: list[Any] = list(model.modules())
    for m in modules:
        weight = getattr(m, "packed_weight", None)
        if not isinstance(weight, GGUFLinearWeight):
            continue
        param = m.weight
        if not weight.complete() and hasattr(m, "gguf_weight"):
            count += 1  # an LM head over a padded vocabulary: the padding rows give 0
            continue
        if not weight.complete():
            with torch.no_grad():
                for first, part in weight.parts:
                    param.data[first : first + part.shape[0]].copy_(part.materialize())
            m.packed_weight = None
            continue
        if not param.is_meta:
            m.weight = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False
            )
        count += 1
    return count


def embedding(ids: torch.Tensor, table: GGUFTensor) -> torch.Tensor:
    """Rows `ids` of `table` as float32 `[*ids.shape, K]` (`F.embedding`'s argument order)."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape[0], table.shape[1], dtype=torch.float32)
    torch.ops.shardline.gguf_embedding(out, table.data, table.type_number, flat)
    return out.view(*ids.shape, table.shape[1])


def finish_gguf_load(model: torch.nn.Module) -> int:
    """After `load_weights`: a vocabulary table kept in GGUF form (`gguf_weight`) serves the
    modules that share its parameter (a tied LM head) and becomes an LM head's GGUF weight; then
    `drop_dense_weights`. Returns how many layers hold GGUF weights."""
    from torch import nn

    modules: list[Any] = list(model.modules())
    tables = {
        id(m.weight): m.gguf_weight
        for m in modules
        if isinstance(getattr(m, "gguf_weight", None), GGUFTensor)
    }
    for m in modules:
        table = tables.get(id(getattr(m, "weight", None)))
        if table is None or not hasattr(m, "gguf_weight"):
            continue
        m.gguf_weight = table
        if hasattr(m, "packed_weight"):  # an LM head: rows past the table's (padding) stay 0
            m.packed_weight = GGUFLinearWeight(
                int(m.weight.shape[0]), int(m.weight.shape[1]), [(0, table)]
            )
    for m in modules:
        if id(getattr(m, "weight", None)) in tables:
            param = m.weight
            m.weight = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False
            )
    return drop_dense_weights(model)
