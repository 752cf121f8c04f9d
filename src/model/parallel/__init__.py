"""Tensor-parallel building blocks: collectives, sharded linears and the vocab-parallel embedding.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's
slice out of the full checkpoint tensor `loaded` (a `torch.Tensor`, or a lazy checkpoint slice
that reads only the requested rows/columns from disk; see `model.loader`).
"""

from shardline.model.parallel.collectives import all_gather, all_reduce
from shardline.model.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from shardline.model.parallel.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from shardline.model.parallel.utils import ShardShapeError, divide

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "ShardShapeError",
    "VocabParallelEmbedding",
    "all_gather",
    "all_reduce",
    "divide",
]
