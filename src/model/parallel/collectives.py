"""Collectives over the tensor-parallel group; each is a no-op when the group has one rank.

They go over the group's shared-memory communicator when `init_distributed` chose one
(`ctx.tp_comm`, CPU ranks on one host), else over torch.distributed. The expert-parallel
combine by all-to-all (`ep_combine_all_to_all`) runs over the EP group with torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from shardline.model.env import env_choice
from shardline.model.parallel_context import ParallelContext
from shardline.model.profiling import timed

EP_COMM_ENV = "SHARDLINE_EP_COMM"
# all-reduce of every rank's partial sums, or all-to-all of the rows each expert needs (then an
# all-gather of each rank's tokens). benchmarks/moe_expert_parallel.py measures both; on gloo
# and on the shared-memory all-reduce of one host the all-reduce is cheaper (RESULTS.md).
EP_COMM_MODES = ("auto", "allreduce", "alltoall")


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


def ep_comm_mode() -> str:
    """How expert-parallel ranks combine their experts' outputs (`SHARDLINE_EP_COMM`; `auto`
    is the all-reduce, the cheaper on gloo and on one host's shared memory)."""
    mode = env_choice(EP_COMM_ENV, EP_COMM_MODES)
    return "allreduce" if mode == "auto" else mode


ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ep_combine_all_to_all(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                          num_local_experts: int, local_experts: ExpertsFn,
                          ctx: ParallelContext) -> torch.Tensor:
    """Every token's weighted sum over its experts, with each (token, expert) pair computed
    on the rank holding the expert: rank r routes the tokens of its slice of the batch, sends
    each pair's row (with the expert id and weight) to the expert's rank, gets the weighted
    results back and sums them; an all-gather of the slices gives every rank the whole batch.

    `local_experts(rows, weights [n, 1], ids [n, 1])` runs this rank's experts."""
    size, rank, group = ctx.ep_size, ctx.ep_rank, ctx.ep_group
    num_tokens, top_k = ids.shape
    per_rank = -(-num_tokens // size)
    first, last = min(rank * per_rank, num_tokens), min((rank + 1) * per_rank, num_tokens)
    with timed("moe_dispatch"):
        pair_ids = ids[first:last].reshape(-1)
        dest = torch.div(pair_ids, num_local_experts, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        rows = hidden[first:last].index_select(0, torch.div(order, top_k, rounding_mode="floor"))
        # Each pair travels as one row: its hidden state, then its expert id and weight.
        packed = torch.cat([rows, pair_ids[order].unsqueeze(1).to(rows.dtype),
                            weights[first:last].reshape(-1)[order].unsqueeze(1)], dim=1)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        received = packed.new_empty(sum(recv_split), packed.shape[1])
        dist.all_to_all_single(received, packed.contiguous(), recv_split, send_split, group=group)
    with timed("moe_experts"):
        hidden_size = hidden.shape[1]
        results = local_experts(received[:, :hidden_size].contiguous(),
                                received[:, hidden_size + 1:].contiguous(),
                                received[:, hidden_size:hidden_size + 1].long())
    with timed("moe_dispatch"):
        returned = results.new_empty(len(order), hidden_size)
        dist.all_to_all_single(returned, results, send_split, recv_split, group=group)
        mine = torch.zeros(per_rank, hidden_size, dtype=hidden.dtype)
        mine.index_add_(0, torch.div(order, top_k, rounding_mode="floor"), returned)
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
    return torch.cat(parts)[:num_tokens]

