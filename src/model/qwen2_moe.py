"""Qwen2-MoE: Qwen2's attention (q/k/v biases); the MLP of every `decoder_sparse_step`-th layer
not in `mlp_only_layers` is a mixture of experts plus a shared expert scaled by a sigmoid gate."""

from __future__ import annotations

import torch
from torch import nn

from shardline.model.config import num_experts_of
from shardline.model.llama import LlamaForCausalLM, LlamaMLP
from shardline.model.moe import SparseMoeBlock


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen1.5-MoE / Qwen2-MoE (`norm_topk_prob` decides the renormalisation)."""

    qkv_bias_default = True
    shared_expert = True

    def is_sparse(self, layer_index: int) -> bool:
        """Whether layer `layer_index` has experts (else a dense MLP of `intermediate_size`)."""
        config = self.config
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        return (
            layer_index not in (getattr(config, "mlp_only_layers", None) or [])
            and num_experts_of(config) > 0
            and (layer_index + 1) % step == 0
        )

    def make_layer(self, layer_index: int, dtype: torch.dtype) -> nn.Module:
        config = self.config
        mlp: nn.Module
        if self.is_sparse(layer_index):
            shared_size = getattr(config, "shared_expert_intermediate_size", 0) or 0
            shared = (
                LlamaMLP(config, self.ctx, dtype, intermediate_size=shared_size)
                if self.shared_expert and shared_size
                else None
            )
            mlp = SparseMoeBlock(
                config,
                self.ctx,
                dtype,
                num_experts=num_experts_of(config),
                top_k=int(config.num_experts_per_tok),
                intermediate_size=int(config.moe_intermediate_size),
                renormalize=bool(getattr(config, "norm_topk_prob", False)),
                shared_expert=shared,
            )
        else:
            mlp = LlamaMLP(config, self.ctx, dtype)
        return self.llama_layer(layer_index, dtype, mlp=mlp)
