"""The vocabulary split over tensor-parallel ranks: input embedding and output head.

Rank r owns token ids `[r * per_rank, (r + 1) * per_rank)`; the vocabulary is padded up to a
multiple of the TP size so any vocabulary works with any TP size (padding rows are zero and
their logits are cut off after the gather).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardline.model.gguf_weights import embedding as gguf_embedding
from shardline.model.gguf_weights import gguf_layer_ok
from shardline.model.packed_linear import linear
from shardline.model.parallel.collectives import all_gather, all_reduce
from shardline.model.parallel.utils import ShardShapeError, copy_checked, read_narrow, shape_of
from shardline.model.parallel_context import ParallelContext


class VocabParallelEmbedding(nn.Module):
    """Embedding table sharded by rows; out-of-shard ids contribute zeros, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: ParallelContext,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = -(-num_embeddings // ctx.tp_size)
        self.vocab_start = ctx.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        # Uninitialised (its pages not touched): `weight_loader` zeroes it before a float copy,
        # and a GGUF table stays in its blocks, so the float table of a large vocabulary (1 GiB
        # for 128,256 x 2,048 float32) is never committed on that path.
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # This rank's rows of a GGUF table kept in their blocks (model.gguf_weights), or None.
        self.gguf_weight: Any = None

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        shape = shape_of(loaded)
        if shape != (self.num_embeddings, self.embedding_dim):
            raise ShardShapeError(
                f"expected shape {[self.num_embeddings, self.embedding_dim]}, got {list(shape)}"
            )
        rows = self.vocab_end - self.vocab_start
        if rows > 0 and gguf_layer_ok(param, loaded):
            self.gguf_weight = read_narrow(loaded, 0, self.vocab_start, rows)
            return
        with torch.no_grad():
            param.data.zero_()
        if rows > 0:
            copy_checked(param.data.narrow(0, 0, rows),
                         read_narrow(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lookup = F.embedding if self.gguf_weight is None else gguf_embedding
        table: Any = self.weight if self.gguf_weight is None else self.gguf_weight
        if self.ctx.tp_size == 1:
            return lookup(input_ids, table)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = lookup(local_ids, table) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.ctx)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded by vocabulary rows; logits are gathered to full vocab."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx: ParallelContext,
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, ctx, dtype)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(self.num_embeddings_per_partition, dtype=dtype), requires_grad=False
            )
            self.bias.weight_loader = self._bias_loader  # type: ignore[union-attr,attr-defined]
        else:
            self.register_parameter("bias", None)
        # The panel-packed copy of `weight` on CPU float32 (model.packed_linear), its GGUF
        # blocks (model.gguf_weights.GGUFLinearWeight), or None.
        self.packed_weight: Any = None

    def _bias_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = self.vocab_end - self.vocab_start
        if shape_of(loaded) != (self.num_embeddings,):
            raise ShardShapeError(f"expected shape [{self.num_embeddings}], got {list(shape_of(loaded))}")
        if rows > 0:
            copy_checked(param.data.narrow(0, 0, rows), read_narrow(loaded, 0, self.vocab_start, rows))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits `[N, vocab]`, identical on every TP rank."""
        logits = linear(hidden, self.weight, self.bias, self.packed_weight)
        if self.ctx.tp_size > 1:
            logits = all_gather(logits, self.ctx, dim=-1)
        return logits[..., : self.num_embeddings]
