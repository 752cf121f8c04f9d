"""Collectives over the tensor-parallel group; each is a no-op when the group has one rank.

They go over the group's shared-memory communicator when `init_distributed` chose one
(`ctx.tp_comm`, CPU ranks on one host), else over torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardline.model.parallel_context import ParallelContext
from shardline.model.profiling import timed


def all_reduce(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum `tensor` over the TP group, in place; returns it."""
    if ctx.tp_size == 1:
        return tensor
    with timed("tp_collectives"):
        if ctx.tp_comm is not None:
            ctx.tp_comm.all_reduce(tensor)
        else:
            dist.all_reduce(tensor, group=ctx.tp_group)
    return tensor


def all_gather(tensor: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's `tensor` along `dim`, in rank order."""
    if ctx.tp_size == 1:
        return tensor
    if ctx.tp_comm is not None:
        with timed("tp_collectives"):
            return ctx.tp_comm.all_gather(tensor, dim=dim)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(ctx.tp_size)]
    with timed("tp_collectives"):
        dist.all_gather(parts, tensor, group=ctx.tp_group)
    return torch.cat(parts, dim=dim)
