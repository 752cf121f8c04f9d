"""Tiny random-weight checkpoints of every architecture shardline runs beyond the Llama family,
built with transformers' own classes (config class -> model class -> `save_pretrained`), with
the byte-level tokenizer of `tiny_models` so the engine can serve them.

Weights are drawn wider than transformers' initialiser (0.02) so that logits are peaked and a
greedy token is never a near-tie; norms are drawn around their identity (1, or 0 for Gemma's
`1 + w` norms) so they matter.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from support.tiny_models import write_tiny_tokenizer

SLIDING_WINDOW = 8  # tokens: the tests' prompts are longer than this
COMMON: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 256,
    "pad_token_id": 256,
}
MOE: dict[str, Any] = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
# architecture -> (transformers config class, model class, config values over COMMON)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "Phi3ForCausalLM": ("Phi3Config", "Phi3ForCausalLM", {}),
    "Gemma2ForCausalLM": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "sliding_window": SLIDING_WINDOW,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "tie_word_embeddings": True,
        },
    ),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "sliding_window": SLIDING_WINDOW,
            "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": True,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
        },
    ),
    "MixtralForCausalLM": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},
    ),
    "Qwen2MoeForCausalLM": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **MOE,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": False,
            "mlp_only_layers": [],
            "decoder_sparse_step": 1,
        },
    ),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**MOE, "norm_topk_prob": True, "mlp_only_layers": [1], "decoder_sparse_step": 1},
    ),
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
# Every layer sliding (the engine gives back the KV blocks before each request's window).
WINDOWED_ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "MistralForCausalLM": (
        "MistralConfig",
        "MistralForCausalLM",
        {"sliding_window": SLIDING_WINDOW},
    ),
}


def make_hf_model_dir(
    path: str | os.PathLike[str], arch: str, seed: int = 0, **overrides: Any
) -> pathlib.Path:
    """Write a random-weight checkpoint of `arch` (a key of ARCHITECTURES or
    WINDOWED_ARCHITECTURES) with a tokenizer."""
    import torch
    import transformers

    config_name, model_name, values = {**ARCHITECTURES, **WINDOWED_ARCHITECTURES}[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **values, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    gemma = arch.startswith("Gemma")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.copy_(0.5 * torch.randn_like(param) / (8.0 if gemma else 1.0))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_tiny_tokenizer(out)
    return out


def hf_greedy(
    path: str | os.PathLike[str], prompts: list[list[int]], max_tokens: int
) -> list[list[int]]:
    """transformers' `generate` greedy continuation of each prompt, alone (exactly
    `max_tokens`, EOS 256 ignored)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    greedy = GenerationConfig(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=256,
        eos_token_id=256,
    )
    with torch.no_grad():
        runs = [
            model.generate(torch.tensor([p]), greedy, attention_mask=torch.ones(1, len(p)))
            for p in prompts
        ]
    return [run[0, len(p) :].tolist() for run, p in zip(runs, prompts, strict=True)]
