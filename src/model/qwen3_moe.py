"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, no biases) with Qwen2-MoE's sparse
layers, without a shared expert."""

from __future__ import annotations

from shardline.model.layers import RMSNorm
from shardline.model.qwen2_moe import Qwen2MoeForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-30B-A3B-style models."""

    qkv_bias_default = False
    shared_expert = False
    qk_norm = RMSNorm
