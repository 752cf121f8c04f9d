"""Small random-weight GGUF files of the issue-24 families that both gguf-py writes and
transformers loads (gemma2, gemma3, phi3, qwen3, qwen3moe, qwen2moe), with gguf-py's GGUFWriter (F32 or Q8_0 2-D
weights; norms and 3-D expert stacks as the type too where it quantizes them).

Sizes transformers does not read from a GGUF file (Qwen3's head_dim; the MoE families'
moe_intermediate_size and shared expert size) are written at transformers' config defaults, so
both sides build the same shapes."""

from __future__ import annotations

import pathlib

import numpy as np

from support.gguf_models import _add_tokenizer, quantized_bytes

# arch -> sizes (hidden, heads, kv_heads, head_dim, intermediate, experts, expert size, shared)
ARCH_SHAPES: dict[str, dict[str, int]] = {
    "gemma2": {"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 256, "inter": 96},
    "gemma3": {"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 256, "inter": 96, "layers": 6},
    "phi3": {"hidden": 64, "heads": 4, "kv_heads": 4, "head_dim": 16, "inter": 96},
    "qwen3": {"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 128, "inter": 96},
    "qwen3moe": {
        "hidden": 64,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 32,
        "inter": 96,
        "experts": 4,
        "top_k": 2,
        "expert_inter": 768,
    },
    "qwen2moe": {
        "hidden": 64,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "inter": 96,
        "experts": 4,
        "top_k": 2,
        "expert_inter": 1408,
        "shared_inter": 5632,
    },
}
VOCAB = 288
LAYERS = 2


def write_tiny_arch_gguf(
    path: pathlib.Path, arch: str, type_name: str = "F32", seed: int = 0
) -> pathlib.Path:
    """A random `arch` GGUF (a key of ARCH_SHAPES) with 2-D weights of `type_name`."""
    import gguf

    dims = ARCH_SHAPES[arch]
    rng = np.random.default_rng(seed)
    h, heads, kv_heads, hd = dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-random-{arch}")
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    layers = dims.get("layers", LAYERS)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(dims["inter"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(1000000.0 if arch == "gemma3" else 10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    if arch == "gemma3":
        writer.add_sliding_window(4)
    if arch == "gemma2":
        writer.add_sliding_window(4)
        writer.add_float32("gemma2.attn_logit_softcapping", 50.0)
        writer.add_float32("gemma2.final_logit_softcapping", 30.0)
    if "experts" in dims:
        writer.add_expert_count(dims["experts"])
        writer.add_expert_used_count(dims["top_k"])
        writer.add_expert_feed_forward_length(dims["expert_inter"])
    if "shared_inter" in dims:
        writer.add_expert_shared_feed_forward_length(dims["shared_inter"])
    _add_tokenizer(writer, VOCAB, None)
    qtype = gguf.GGMLQuantizationType[type_name]

    def add(name: str, *shape: int, scale: float = 0.2) -> None:
        values = rng.normal(0, scale, size=shape)
        data = quantized_bytes(values.reshape(-1, shape[-1]), type_name, rng)
        data = data.reshape(*shape[:-1], -1)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)

    def vector(name: str, size: int, around: float) -> None:
        writer.add_tensor(name, (around + rng.normal(0, 0.1, size=size)).astype(np.float32))

    add("token_embd.weight", VOCAB, h, scale=0.5)
    for i in range(layers):
        vector(f"blk.{i}.attn_norm.weight", h, 1.0)
        if arch == "phi3":  # fused q/k/v
            add(f"blk.{i}.attn_qkv.weight", (heads + 2 * kv_heads) * hd, h)
        else:
            add(f"blk.{i}.attn_q.weight", heads * hd, h)
            add(f"blk.{i}.attn_k.weight", kv_heads * hd, h)
            add(f"blk.{i}.attn_v.weight", kv_heads * hd, h)
        if arch.startswith("gemma"):  # sandwich norms, stored as 1 + w
            vector(f"blk.{i}.post_attention_norm.weight", h, 1.0)
            vector(f"blk.{i}.post_ffw_norm.weight", h, 1.0)
        if arch == "qwen2moe":  # Qwen2's q/k/v biases
            vector(f"blk.{i}.attn_q.bias", heads * hd, 0.0)
            vector(f"blk.{i}.attn_k.bias", kv_heads * hd, 0.0)
            vector(f"blk.{i}.attn_v.bias", kv_heads * hd, 0.0)
        elif arch in ("qwen3", "qwen3moe", "gemma3"):  # per-head q/k norms
            vector(f"blk.{i}.attn_q_norm.weight", hd, 1.0)
            vector(f"blk.{i}.attn_k_norm.weight", hd, 1.0)
        add(f"blk.{i}.attn_output.weight", h, heads * hd)
        vector(f"blk.{i}.ffn_norm.weight", h, 1.0)
        if arch == "phi3":  # fused gate + up
            add(f"blk.{i}.ffn_up.weight", 2 * dims["inter"], h)
            add(f"blk.{i}.ffn_down.weight", h, dims["inter"])
            continue
        if "experts" not in dims:
            add(f"blk.{i}.ffn_gate.weight", dims["inter"], h)
            add(f"blk.{i}.ffn_up.weight", dims["inter"], h)
            add(f"blk.{i}.ffn_down.weight", h, dims["inter"])
            continue
        experts, inter = dims["experts"], dims["expert_inter"]
        add(f"blk.{i}.ffn_gate_inp.weight", experts, h, scale=1.0)
        add(f"blk.{i}.ffn_gate_exps.weight", experts, inter, h, scale=0.05)
        add(f"blk.{i}.ffn_up_exps.weight", experts, inter, h, scale=0.05)
        add(f"blk.{i}.ffn_down_exps.weight", experts, h, inter, scale=0.05)
        if "shared_inter" in dims:
            shared = dims["shared_inter"]
            vector(f"blk.{i}.ffn_gate_inp_shexp.weight", h, 0.0)
            add(f"blk.{i}.ffn_gate_shexp.weight", shared, h, scale=0.03)
            add(f"blk.{i}.ffn_up_shexp.weight", shared, h, scale=0.03)
            add(f"blk.{i}.ffn_down_shexp.weight", h, shared, scale=0.03)
    vector("output_norm.weight", h, 1.0)
    if not arch.startswith("gemma"):  # Gemma ties its head to the embedding
        add("output.weight", VOCAB, h)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for the llama architecture (convert_hf_to_gguf's permute)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_mixtral_gguf(path: pathlib.Path, model: object) -> pathlib.Path:
    """A transformers MixtralForCausalLM's weights as llama.cpp writes Mixtral: architecture
    `llama` with an expert count, q/k rows permuted, experts stacked (F32)."""
    import gguf

    config = model.config  # type: ignore[attr-defined]
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    h, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    inter, layers = config.intermediate_size, config.num_hidden_layers
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    _add_tokenizer(writer, config.vocab_size, None)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(
            f"blk.{i}.attn_q.weight",
            _llama_cpp_permute(state[p + "self_attn.q_proj.weight"], heads),
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight",
            _llama_cpp_permute(state[p + "self_attn.k_proj.weight"], kv_heads),
        )
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", state[p + "mlp.gate.weight"])
        gate_up = state[p + "mlp.experts.gate_up_proj"]  # [experts, 2 * inter, hidden]: gate, up
        writer.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :inter]))
        writer.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, inter:]))
        writer.add_tensor(f"blk.{i}.ffn_down_exps.weight", state[p + "mlp.experts.down_proj"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
