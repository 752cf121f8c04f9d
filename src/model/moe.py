"""Mixture-of-experts: the router's top-k, grouped expert GEMMs, expert parallelism.

`SparseMoeBlock` is the MLP of a MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE): a router linear
scores every expert per token, the top-k experts are kept (their softmax weights renormalised
when the config says so), and `FusedMoE` runs the experts. It never loops over tokens in
Python: the (token, expert) pairs are sorted by expert, each expert with tokens runs two GEMMs
over its rows (gate_up, then down), and the weighted rows are summed back per token with one
`index_add_`.

Weights are stacked per layer: `w13_weight [experts, 2 * intermediate, hidden]` (gate rows
then up rows) and `w2_weight [experts, hidden, intermediate]`. How they split over the ranks
of a tensor-parallel group:

    mode                         rank r holds                                  then
    ---------------------------  --------------------------------------------  -----------------
    tensor parallel (default)    every expert, intermediate rows/cols slice r  all-reduce (sum)
    expert parallel (`ep_size`)  experts [r * E / ep, (r + 1) * E / ep), whole  combine over EP

Under expert parallelism the EP group is the TP group of the pipeline stage (the hidden states
are already the same on each of its ranks), so a rank runs only the (token, expert) pairs of
its own experts. Their weighted sums are combined over the group by an all-reduce, or by an
all-to-all that sends each rank only the rows for its experts (`SHARDLINE_EP_COMM=allreduce|
alltoall`; `parallel/collectives.py`); both give the same numbers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardline.model.config import check_expert_split
from shardline.model.layers import gated_activation
from shardline.model.parallel.collectives import all_reduce, ep_combine_all_to_all, ep_comm_mode
from shardline.model.parallel.linear import ReplicatedLinear
from shardline.model.parallel.utils import ShardShapeError, copy_checked, divide, read, read_narrow
from shardline.model.parallel_context import ParallelContext
from shardline.model.profiling import timed

# checkpoint projection name -> (stacked parameter, index inside it: 0 gate, 1 up, 2 down)
_EXPERT_PROJECTIONS = {
    "w1": ("w13_weight", 0),
    "gate_proj": ("w13_weight", 0),
    "w3": ("w13_weight", 1),
    "up_proj": ("w13_weight", 1),
    "w2": ("w2_weight", 2),
    "down_proj": ("w2_weight", 2),
}
_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def expert_param_for(name: str) -> tuple[str, tuple[int, int]] | None:
    """(stacked parameter, (expert, projection)) of a per-expert checkpoint tensor such as
    `model.layers.0.block_sparse_moe.experts.3.w1.weight`; None for any other tensor."""
    match = _EXPERT_TENSOR.match(name)
    if match is None or match.group(3) not in _EXPERT_PROJECTIONS:
        return None
    param, projection = _EXPERT_PROJECTIONS[match.group(3)]
    return f"{match.group(1)}.{param}", (int(match.group(2)), projection)


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights `[T, k]`, expert ids `[T, k]`): softmax in float32, top-k, renormalised over
    the k when asked, weights cast to `dtype` (as transformers' routers)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    first_expert: int,
    act_fn: nn.Module,
) -> torch.Tensor:
    """`[T, hidden]`: for each token, the weighted sum of its chosen experts among the local
    ones (`first_expert .. first_expert + len(w13) - 1`); pairs with other experts add nothing.

    The pairs are sorted by expert, so each expert runs one GEMM pair over all its rows; the
    only Python loop is over the local experts (an expert without rows is skipped)."""
    num_tokens, top_k = topk_ids.shape
    num_local = w13.shape[0]
    local = topk_ids.reshape(-1) - first_expert
    pair_index = ((local >= 0) & (local < num_local)).nonzero().squeeze(1)
    local = local[pair_index]
    order = torch.argsort(local, stable=True)
    pair_index = pair_index[order]
    counts = torch.bincount(local, minlength=num_local).tolist()
    token_index = pair_index // top_k
    rows = hidden.index_select(0, token_index)
    out_rows = torch.empty_like(rows)
    offset = 0
    for expert, count in enumerate(counts):
        if count:
            chunk = rows[offset : offset + count]
            out_rows[offset : offset + count] = F.linear(
                act_fn(F.linear(chunk, w13[expert])), w2[expert]
            )
        offset += count
    out_rows *= topk_weights.reshape(-1)[pair_index].unsqueeze(1)
    return torch.zeros_like(hidden).index_add_(0, token_index, out_rows)


class FusedMoE(nn.Module):
    """This rank's experts of one layer (see the module docstring for the split) and their
    grouped GEMMs; `forward` returns this rank's partial sum, `SparseMoeBlock` combines."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        ctx: ParallelContext,
        dtype: torch.dtype,
        *,
        renormalize: bool,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        check_expert_split(num_experts, ctx.ep_size)
        self.num_local_experts = num_experts // ctx.ep_size
        self.first_expert = ctx.ep_rank * self.num_local_experts
        # Without EP the intermediate dimension of every expert is split over the TP ranks.
        self.tp_split = ctx.tp_size if ctx.ep_size == 1 else 1
        self.tp_index = ctx.tp_rank if ctx.ep_size == 1 else 0
        self.intermediate = divide(intermediate_size, self.tp_split, "moe_intermediate_size")
        self.full_intermediate = intermediate_size
        self.hidden_size = hidden_size
        self.w13_weight = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * self.intermediate, hidden_size, dtype=dtype),
            requires_grad=False,
        )
        self.w2_weight = nn.Parameter(
            torch.empty(self.num_local_experts, hidden_size, self.intermediate, dtype=dtype),
            requires_grad=False,
        )
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.act_fn = gated_activation(activation)

    def checkpoint_shards(self, prefix: str) -> dict[str, dict[tuple[int, int], str]]:
        """{parameter: {(expert, projection): checkpoint tensor}} this rank must load, under
        Qwen's names (`gate_proj`/`up_proj`/`down_proj`) or Mixtral's (`w1`/`w3`/`w2`):
        `prefix` ends in `block_sparse_moe.experts` for Mixtral."""
        names = (
            ("w1", "w3", "w2")
            if ".block_sparse_moe." in f"{prefix}."
            else ("gate_proj", "up_proj", "down_proj")
        )
        experts = range(self.first_expert, self.first_expert + self.num_local_experts)
        return {
            "w13_weight": {
                (e, j): f"{prefix}.{e}.{names[j]}.weight" for e in experts for j in (0, 1)
            },
            "w2_weight": {(e, 2): f"{prefix}.{e}.{names[2]}.weight" for e in experts},
        }

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of expert `shard_id[0]`'s projection `shard_id[1]`; another
        rank's expert is skipped."""
        expert, projection = shard_id
        local = expert - self.first_expert
        if not 0 <= expert < self.num_experts:
            raise ShardShapeError(f"expert {expert} is outside the model's {self.num_experts}")
        if not 0 <= local < self.num_local_experts:
            return
        size = self.intermediate
        if projection == 2:  # down: [hidden, intermediate], split by columns
            expected = (self.hidden_size, self.full_intermediate)
            part = (
                read_narrow(loaded, 1, self.tp_index * size, size)
                if self.tp_split > 1
                else read(loaded)
            )
            target = param.data[local]
        else:  # gate or up: [intermediate, hidden], split by rows
            expected = (self.full_intermediate, self.hidden_size)
            part = (
                read_narrow(loaded, 0, self.tp_index * size, size)
                if self.tp_split > 1
                else read(loaded)
            )
            target = param.data[local].narrow(0, projection * size, size)
        if tuple(int(s) for s in loaded.shape) != expected:
            raise ShardShapeError(f"expected shape {list(expected)}, got {list(loaded.shape)}")
        copy_checked(target, part)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """`[T, hidden]`, every token's weighted sum over its experts, the same on every rank
        of the group (the ranks' partial sums combined)."""
        with timed("moe_router"):
            weights, ids = route(router_logits, self.top_k, self.renormalize, hidden.dtype)
        if self.ctx.ep_size > 1 and ep_comm_mode() == "alltoall":
            return ep_combine_all_to_all(
                hidden, weights, ids, self.num_local_experts, self._local_experts, self.ctx
            )
        with timed("moe_experts"):
            out = self._local_experts(hidden, weights, ids)
        if self.ctx.tp_size > 1:
            with timed("moe_combine"):
                out = all_reduce(out, self.ctx)
        return out

    def _local_experts(
        self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        return fused_experts(
            hidden, self.w13_weight, self.w2_weight, weights, ids, self.first_expert, self.act_fn
        )


class SparseMoeBlock(nn.Module):
    """A MoE layer's MLP: router (`gate`), experts, optionally a shared expert scaled by a
    sigmoid gate (Qwen2-MoE); the output is the same on every rank of the group."""

    def __init__(
        self,
        config: Any,
        ctx: ParallelContext,
        dtype: torch.dtype,
        *,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        hidden = config.hidden_size
        self.gate = ReplicatedLinear(hidden, num_experts, False, ctx, dtype=dtype)
        activation = getattr(config, "hidden_act", "silu")
        self.experts = FusedMoE(
            num_experts,
            top_k,
            hidden,
            intermediate_size,
            ctx,
            dtype,
            renormalize=renormalize,
            activation=activation,
        )
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, False, ctx, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out
