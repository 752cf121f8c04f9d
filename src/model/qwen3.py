"""Qwen3: the Llama layout with an RMSNorm over each head of q and k before the rotary."""

from __future__ import annotations

from shardline.model.layers import RMSNorm
from shardline.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense models (`q_norm` / `k_norm` per head; q/k/v biases only with
    `attention_bias`)."""

    qk_norm = RMSNorm
