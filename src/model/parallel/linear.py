"""Linear layers sharded over the tensor-parallel group (Megatron style).

Column-parallel layers split the output features, row-parallel layers split the input features;
a Column -> Row pair (attention qkv -> o, mlp gate_up -> down) needs one all-reduce, which lives
in `RowParallelLinear.forward`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardline.model.gguf_weights import add_part, gguf_layer_ok
from shardline.model.packed_linear import linear
from shardline.model.parallel.collectives import all_gather, all_reduce
from shardline.model.parallel.utils import (
    ShardShapeError,
    copy_checked,
    divide,
    read,
    read_narrow,
    shape_of,
)
from shardline.model.parallel_context import ParallelContext


class LinearBase(nn.Module):
    """Holds a local `[out_local, in_local]` weight (and bias) whose loader takes its shard."""

    def __init__(
        self,
        in_local: int,
        out_local: int,
        bias: bool,
        ctx: ParallelContext,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.tp_rank = ctx.tp_rank
        self.tp_size = ctx.tp_size
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(out_local, dtype=dtype), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader  # type: ignore[union-attr,attr-defined]
        else:
            self.register_parameter("bias", None)
        # The panel-packed copy of `weight` on CPU float32 (model.packed_linear), its GGUF
        # blocks (model.gguf_weights.GGUFLinearWeight), or None.
        self.packed_weight: Any = None

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        raise NotImplementedError

    def _store(self, param: nn.Parameter, offset: int, shard: Any) -> None:
        """Rows `[offset, offset + len(shard))` of `param` are `shard`: kept in its GGUF form
        where this layer runs GGUF weights (model.gguf_weights), else copied."""
        if param.dim() == 2 and gguf_layer_ok(param, shard):
            add_part(self, param, offset, shard)
        else:
            copy_checked(param.data.narrow(0, offset, shape_of(shard)[0]) if param.dim() else param.data, shard)


class ReplicatedLinear(LinearBase):
    """A plain linear layer, the same on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: ParallelContext,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, output_size, bias, ctx, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        check_full_shape(loaded, tuple(param.shape))
        self._store(param, 0, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class ColumnParallelLinear(LinearBase):
    """`y = x A^T + b` with A split along its output rows; rank r holds rows of block r."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: ParallelContext,
                 gather_output: bool = False, dtype: torch.dtype | None = None) -> None:
        self.output_size_per_partition = divide(output_size, ctx.tp_size, "output features")
        super().__init__(input_size, self.output_size_per_partition, bias, ctx, dtype)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        size = param.shape[0]
        check_full_shape(loaded, (size * self.tp_size, *param.shape[1:]))
        self._store(param, 0, read_narrow(loaded, 0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, self.packed_weight)
        return all_gather(y, self.ctx) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 ctx: ParallelContext, dtype: torch.dtype | None = None) -> None:
        self.output_sizes = list(output_sizes)
        for size in output_sizes:
            divide(size, ctx.tp_size, "output features")
        super().__init__(input_size, sum(output_sizes), bias, ctx, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be 0..{len(self.output_sizes) - 1}, got {shard_id!r}")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        check_full_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        self._store(param, offset, read_narrow(loaded, 0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split over ranks, grouped-query aware.

    With fewer KV heads than ranks each KV head is replicated on `tp_size // num_kv_heads`
    consecutive ranks, so every rank holds exactly one KV head.
    """

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool, ctx: ParallelContext,
                 dtype: torch.dtype | None = None) -> None:
        tp = ctx.tp_size
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, "num_attention_heads")
        if tp >= total_num_kv_heads:
            self.num_kv_heads = 1
            if tp % total_num_kv_heads != 0:
                raise ValueError(
                    f"tensor_parallel_size={tp} must be a multiple of "
                    f"num_key_value_heads={total_num_kv_heads} to replicate the KV heads"
                )
            self.num_kv_head_replicas = tp // total_num_kv_heads
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp * head_dim
        super().__init__(hidden_size, output_size, bias, ctx, dtype=dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
            expected_rows = self.total_num_heads * self.head_dim
        elif shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size = self.kv_size
            start = (self.tp_rank // self.num_kv_head_replicas) * self.kv_size
            expected_rows = self.total_num_kv_heads * self.head_dim
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        check_full_shape(loaded, (expected_rows, *param.shape[1:]))
        self._store(param, offset, read_narrow(loaded, 0, start, size))


class RowParallelLinear(LinearBase):
    """`y = x A^T + b` with A split along its input columns; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: ParallelContext,
                 reduce_results: bool = True, dtype: torch.dtype | None = None) -> None:
        self.input_size_per_partition = divide(input_size, ctx.tp_size, "input features")
        super().__init__(self.input_size_per_partition, output_size, bias, ctx, dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction: not sharded
            copy_checked(param.data, read(loaded))
            return
        size = param.shape[1]
        check_full_shape(loaded, (param.shape[0], size * self.tp_size))
        self._store(param, 0, read_narrow(loaded, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, None, self.packed_weight)
        if self.tp_size > 1 and self.reduce_results:
            y = all_reduce(y, self.ctx)
        if self.bias is not None:
            y = y + self.bias
        return y


def check_full_shape(loaded: Any, expected: tuple[int, ...]) -> None:
    """The checkpoint tensor must have the unsharded shape the layer was built for."""
    if shape_of(loaded) != tuple(expected):
        raise ShardShapeError(f"expected shape {list(expected)}, got {list(shape_of(loaded))}")
