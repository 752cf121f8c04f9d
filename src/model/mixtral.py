"""Mixtral: Mistral's attention with a sparse mixture of experts as every layer's MLP.

The checkpoint names the MoE `block_sparse_moe` (`gate`, `experts.{e}.w1/w3/w2`); the router's
top-k weights are always renormalised."""

from __future__ import annotations

import torch
from torch import nn

from shardline.model.config import num_experts_of
from shardline.model.llama import LlamaForCausalLM
from shardline.model.moe import SparseMoeBlock


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral 8x7B-style models: `num_local_experts` experts, `num_experts_per_tok` per token."""

    def make_layer(self, layer_index: int, dtype: torch.dtype) -> nn.Module:
        config = self.config
        moe = SparseMoeBlock(
            config,
            self.ctx,
            dtype,
            num_experts=num_experts_of(config),
            top_k=config.num_experts_per_tok,
            intermediate_size=config.intermediate_size,
            renormalize=True,
        )
        return self.llama_layer(layer_index, dtype, mlp=moe, mlp_name="block_sparse_moe")
