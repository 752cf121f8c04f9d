"""Small random-weight Llama GGUF files, written with gguf-py's GGUFWriter, one quantization
type per file (the types shardline has kernels for).

Values come from `gguf.quants.quantize` where gguf-py can quantize the type; for the K-quants
(which it can only dequantize) the blocks are random bytes whose float16 scales are set to
bounded values, so every weight stays small.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# Each type's float16 scale fields (byte offsets within a block) and the largest |scale
# multiple| a value can reach, so d can be set for weights of about `target` in size.
K_QUANT_SCALES = {
    "Q2_K": ((80, 82), 15 * 3),
    "Q3_K": ((108,), 32 * 4),
    "Q4_K": ((0, 2), 63 * 15),
    "Q5_K": ((0, 2), 63 * 31),
    "Q6_K": ((208,), 128 * 32),
}
QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
ALL_TYPES = QUANTIZABLE + tuple(K_QUANT_SCALES)

TINY = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 288}


def quantized_bytes(
    values: np.ndarray, type_name: str, rng: np.random.Generator, target: float = 0.08
) -> np.ndarray:
    """`values` `[N, K]` as the type's blocks `[N, row_bytes]` (uint8; F32/F16 as their dtype)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    if type_name in QUANTIZABLE:
        return gguf.quants.quantize(values.astype(np.float32), qtype)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n, k = values.shape
    blocks = rng.integers(0, 256, size=(n * k // block, nbytes), dtype=np.uint8)
    offsets, reach = K_QUANT_SCALES[type_name]
    for offset in offsets:
        scale = (rng.uniform(0.5, 1.0, size=blocks.shape[0]) * target / reach).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


def write_tiny_llama_gguf(
    path: pathlib.Path,
    type_name: str,
    seed: int = 0,
    *,
    tied: bool = False,
    chat_template: str | None = None,
    shape: dict[str, int] | None = None,
    extra: Callable[[Any], None] | None = None,
    types: dict[str, str] | None = None,
) -> pathlib.Path:
    """A Llama GGUF with random weights: every 2-D weight of `type_name` (or of `types[name]`,
    e.g. `{"blk.0.attn_v.weight": "Q6_K"}` for a llama.cpp-like mix), norms F32;
    `extra(writer)` adds metadata or tensors of its own before the file is written."""
    import gguf

    dims = {**TINY, **(shape or {})}
    rng = np.random.default_rng(seed)
    h, inter, heads, kv_heads = (
        dims["hidden"],
        dims["intermediate"],
        dims["heads"],
        dims["kv_heads"],
    )
    head_dim = h // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_block_count(dims["layers"])
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(dims["vocab"])
    _add_tokenizer(writer, dims["vocab"], chat_template)

    def add(name: str, rows: int, cols: int) -> None:
        kind = (types or {}).get(name, type_name)
        data = quantized_bytes(rng.normal(0, 0.05, size=(rows, cols)), kind, rng)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            writer.add_tensor(name, data)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + rng.normal(0, 0.1, size=h)).astype(np.float32))

    add("token_embd.weight", dims["vocab"], h)
    for i in range(dims["layers"]):
        norm(f"blk.{i}.attn_norm.weight")
        add(f"blk.{i}.attn_q.weight", heads * head_dim, h)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, h)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, h)
        add(f"blk.{i}.attn_output.weight", h, heads * head_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        add(f"blk.{i}.ffn_gate.weight", inter, h)
        add(f"blk.{i}.ffn_up.weight", inter, h)
        add(f"blk.{i}.ffn_down.weight", h, inter)
    norm("output_norm.weight")
    if not tied:
        add("output.weight", dims["vocab"], h)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: object, vocab: int, chat_template: str | None) -> None:
    """A SentencePiece-style ("llama") vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then
    a few words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = [
        "▁the",
        "▁a",
        "▁is",
        "▁of",
        "▁and",
        "▁to",
        "▁in",
        "▁sky",
        "▁blue",
        "▁Hello",
        "▁world",
        "he",
        "ll",
        "o",
        "▁wh",
        "y",
    ]
    tokens += words[: vocab - len(tokens)]
    tokens += [f"▁w{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(vocab - 259)]
    writer.add_tokenizer_model("llama")  # type: ignore[attr-defined]
    writer.add_token_list(tokens)  # type: ignore[attr-defined]
    writer.add_token_scores(scores)  # type: ignore[attr-defined]
    writer.add_token_types(types)  # type: ignore[attr-defined]
    writer.add_bos_token_id(1)  # type: ignore[attr-defined]
    writer.add_eos_token_id(2)  # type: ignore[attr-defined]
    writer.add_unk_token_id(0)  # type: ignore[attr-defined]
    writer.add_add_bos_token(True)  # type: ignore[attr-defined]
    writer.add_add_eos_token(False)  # type: ignore[attr-defined]
    if chat_template is not None:
        writer.add_chat_template(chat_template)  # type: ignore[attr-defined]


def prefill_logits(model: object, ids: list[int]) -> torch.Tensor:
    """Logits of one prefill of `ids` (no KV cache reuse)."""
    from shardline.model.attention import AttentionMetadata

    blocks = -(-len(ids) // 4)
    attn = AttentionMetadata.build(
        query_lens=[len(ids)], context_lens=[0], block_tables=[list(range(blocks))], block_size=4
    )
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), attn))


def greedy_pair(ref: Any, model: object, ids: list[int], steps: int = 4) -> tuple[list[int], list[int]]:
    """`steps` greedy tokens after `ids` from a transformers model `ref` and from shardline's
    `model`, each step the full sequence again: (shardline's sequence, transformers')."""
    seq_ref, seq = list(ids), list(ids)
    for _ in range(steps):
        with torch.no_grad():
            seq_ref.append(int(ref(torch.tensor([seq_ref])).logits[0, -1].argmax()))
        seq.append(int(prefill_logits(model, seq)[-1].argmax()))
    return seq, seq_ref


def gguf_py_values(t: Any) -> torch.Tensor:
    """A `GGUFTensor`'s values as gguf-py's `dequantize` gives them (float32)."""
    import gguf

    raw = np.ascontiguousarray(t.data.numpy())
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.type_number))
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(t.shape).copy())
