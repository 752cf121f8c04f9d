"""GGUF files written from a transformers model's own weights and config, as llama.cpp's
`convert_hf_to_gguf.py` writes them (F32): Llama (q/k rows permuted) and Phi-3 (fused qkv and
gate + up), with the rope settings a test adds through `extra(writer)`. The reference for
shardline on such a file is that transformers model, built from its Hugging Face config (whose
rope scaling transformers' own GGUF loader may not read, e.g. `rope_freqs.weight`).

`llama3_rope_freqs` computes Llama 3.1's rope scaling as llama.cpp's converter writes it
(`LlamaModel.generate_extra_tensors`): one factor per rotary frequency, 1 for the high
frequencies, `factor` for the low ones, `1 / ((1 - smooth) / factor + smooth)` between."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from support.gguf_arch_models import _llama_cpp_permute
from support.gguf_models import _add_tokenizer

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def llama3_rope_freqs(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for a `llama3` rope scaling (float32, head_dim / 2).

    (The converter reads the original context length from the config's top level, default
    8192, the value every Llama 3.x rope_scaling holds; here it is the scaling's own.)"""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def random_hf_model(kind: str, seed: int = 0, **config: Any) -> Any:
    """A transformers `LlamaForCausalLM` / `Phi3ForCausalLM` (float32, eval) with random weights
    drawn wide enough that attention depends on position (so rope scaling shows in the logits)."""
    import transformers

    torch.manual_seed(seed)
    values = {
        "vocab_size": 288,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        **config,
    }
    cfg = getattr(transformers, f"{kind}Config")(**values)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.25 if "proj" in name and "self_attn" in name else 0.1)
    return model


def write_gguf_from_hf(
    path: pathlib.Path, model: Any, arch: str, extra: Callable[[Any], None] | None = None
) -> pathlib.Path:
    """`model`'s weights and shape metadata as a GGUF of architecture `arch` (llama or phi3);
    `extra(writer)` adds the rope metadata and tensors."""
    import gguf

    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    h, heads = config.hidden_size, config.num_attention_heads
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(h)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, config.vocab_size, None)
    if extra is not None:
        extra(writer)
    for name, hf_name in GLOBAL_TENSORS.items():
        writer.add_tensor(name, state[hf_name])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        if arch == "phi3":
            writer.add_tensor(f"blk.{i}.attn_qkv.weight", state[p + "self_attn.qkv_proj.weight"])
            writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.gate_up_proj.weight"])
        else:
            q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
            writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(q, heads))
            writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(k, kv_heads))
            writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
            writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
