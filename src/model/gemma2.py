"""Gemma 2: embeddings scaled by sqrt(hidden), GeGLU, "sandwich" norms (before and after both
attention and MLP, each `x * (1 + w)`), attention scaled by `query_pre_attn_scalar`^-0.5 with
its scores soft-capped, sliding-window and global layers alternating, final logits soft-capped."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardline.model.attention import AttentionMetadata
from shardline.model.layers import GemmaRMSNorm, RotaryEmbedding
from shardline.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from shardline.model.parallel_context import ParallelContext


class GemmaDecoderLayer(nn.Module):
    """norm -> attention -> norm, + residual; norm -> MLP -> norm, + residual (the adds fused
    into the next norm, so the `(hidden, residual)` protocol is Llama's)."""

    is_plain = False  # not what the C++ layer loop computes

    def __init__(
        self, config: Any, ctx: ParallelContext, dtype: torch.dtype, self_attn: LlamaAttention
    ) -> None:
        super().__init__()
        eps, size = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype)
        self.mlp = LlamaMLP(config, ctx, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionMetadata,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, attn, rotary))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 (2B / 9B / 27B)."""

    norm_cls = GemmaRMSNorm

    def embed_scale(self) -> float | None:
        return float(self.config.hidden_size) ** 0.5

    def make_layer(self, layer_index: int, dtype: torch.dtype) -> nn.Module:
        config = self.config
        scalar = getattr(config, "query_pre_attn_scalar", None)
        attention = self.make_attention(
            layer_index,
            dtype,
            scale=None if scalar is None else float(scalar) ** -0.5,
            logit_softcap=getattr(config, "attn_logit_softcapping", None),
        )
        return GemmaDecoderLayer(config, self.ctx, dtype, attention)
