"""Tiny random-weight Llama-family checkpoints, with a tokenizer, written as HF directories.

`make_tiny_model_dir(path)` writes config.json, model.safetensors, tokenizer.json (byte-level
BPE over the 256 byte tokens, no merges, plus chat special tokens) and tokenizer_config.json
(with a ChatML chat template). The directory loads with shardline's loader and with
transformers' AutoModelForCausalLM / AutoTokenizer, so the engine can run end to end on it in
seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "MistralForCausalLM": "mistral"}


def write_tiny_tokenizer(path: pathlib.Path) -> dict[str, int]:
    """Byte-level BPE: ids 0..255 are bytes, then the special tokens. Returns special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(path / "tokenizer.json"))
    special = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for tok, i in special.items()
        },
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return special


def _byte_of(ch: str) -> int:
    # The GPT-2 byte <-> unicode table: printable bytes map to themselves, the rest to 256+.
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def make_tiny_model_dir(
    path: str | os.PathLike[str],
    arch: str = "LlamaForCausalLM",
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 320,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    shards: int = 1,
) -> pathlib.Path:
    """Write a random-weight HF checkpoint of `arch` with a tokenizer; returns the directory.

    `vocab_size` must cover the 256 byte tokens and 3 special tokens (>= 259); `shards > 1`
    splits the weights over several files with a `model.safetensors.index.json`.
    """
    import torch
    from safetensors.torch import save_file

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 259 tokenizer tokens")
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    special = write_tiny_tokenizer(out)
    head_dim = hidden_size // num_heads
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": special["<|endoftext|>"],
        "pad_token_id": special["<|endoftext|>"],
        "torch_dtype": "float32",
        "attention_bias": False,
        "use_sliding_window": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm_weight() -> torch.Tensor:
        return 1.0 + rand(hidden_size, scale=0.1)

    kv_dim = num_kv_heads * head_dim
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab_size, hidden_size, scale=0.5)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm_weight()
        tensors[p + "post_attention_layernorm.weight"] = norm_weight()
        tensors[p + "self_attn.q_proj.weight"] = rand(num_heads * head_dim, hidden_size, scale=0.2)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_dim, hidden_size, scale=0.2)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_dim, hidden_size)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden_size, num_heads * head_dim)
        if arch == "Qwen2ForCausalLM":
            tensors[p + "self_attn.q_proj.bias"] = rand(num_heads * head_dim)
            tensors[p + "self_attn.k_proj.bias"] = rand(kv_dim)
            tensors[p + "self_attn.v_proj.bias"] = rand(kv_dim)
        tensors[p + "mlp.gate_proj.weight"] = rand(intermediate_size, hidden_size)
        tensors[p + "mlp.up_proj.weight"] = rand(intermediate_size, hidden_size)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden_size, intermediate_size)
    tensors["model.norm.weight"] = norm_weight()
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = rand(vocab_size, hidden_size)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def recording_factory(model_config: Any, parallel_context: Any) -> Any:
    """A registry factory for tests: records the rank it saw, then builds a Llama.

    Writes `rank-<tp_rank>.json` with the context's ranks and sizes into the directory named by
    the SHARDLINE_TEST_RECORD_DIR environment variable.
    """
    from shardline.model.llama import LlamaForCausalLM

    record_dir = pathlib.Path(os.environ["SHARDLINE_TEST_RECORD_DIR"])
    seen = {
        "tp_rank": parallel_context.get_tensor_parallel_rank(),
        "tp_size": parallel_context.get_tensor_parallel_world_size(),
        "pp_rank": parallel_context.get_pipeline_parallel_rank(),
        "pp_size": parallel_context.get_pipeline_parallel_world_size(),
        "pid": os.getpid(),
        "has_group": parallel_context.tp_group is not None,
    }
    (record_dir / f"rank-{seen['tp_rank']}.json").write_text(json.dumps(seen))
    return LlamaForCausalLM(model_config, parallel_context)


def gguf_round_trip(weight: Any, qtype: str = "Q4_1") -> Any:
    """`weight` (float32 [N, K], K a multiple of 32) quantized to GGUF's `qtype` and dequantized
    back to float32 by the `gguf` package, as a GGUF checkpoint's weights load."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[qtype]
    values = weight.detach().to(torch.float32).numpy()
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(quants.quantize(values, kind), kind)))


def quantize_linear_weights(model: Any, qtypes: tuple[str, ...] = ("Q4_1", "Q8_0", "Q4_0")) -> int:
    """Give a loaded model's packable linear weights (every module with a `packed_weight` slot
    whose K is a multiple of 32) GGUF-quantized values, in place, cycling through `qtypes`;
    returns how many it changed."""
    import torch

    changed = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not hasattr(module, "packed_weight") or weight is None or weight.shape[-1] % 32:
                continue
            weight.copy_(gguf_round_trip(weight, qtypes[changed % len(qtypes)]))
            changed += 1
    return changed


def quantize_checkpoint(path: str | os.PathLike[str], qtype: str = "Q4_1") -> int:
    """Rewrite a checkpoint directory's 2-D weights whose inputs are a multiple of 32 with
    GGUF-quantized values (`gguf_round_trip`), as a converted GGUF checkpoint holds them;
    returns how many it changed."""
    from safetensors.torch import load_file, save_file

    changed = 0
    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        tensors = load_file(str(file))
        for name, tensor in tensors.items():
            if tensor.dim() == 2 and tensor.shape[1] % 32 == 0:
                tensors[name] = gguf_round_trip(tensor, qtype)
                changed += 1
        save_file(tensors, str(file), metadata={"format": "pt"})
    return changed
