"""Phi-3: the Llama layout, but the checkpoint fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`. Each fused tensor is split into its parts' row ranges here (still lazy: a TP
rank reads only its rows of each part), so the parallel linears load them as Llama's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shardline.model.llama import LlamaForCausalLM, head_dim_of
from shardline.model.parallel.utils import read_narrow, shape_of


class RowRange:
    """Rows `[start, start + length)` of a checkpoint tensor (a tensor or a lazy slice), read
    only as far as a weight loader narrows it."""

    def __init__(self, loaded: Any, start: int, length: int) -> None:
        self.loaded = loaded
        self.start = start
        self.shape = (length, *shape_of(loaded)[1:])

    def narrow(self, dim: int, start: int, length: int) -> Any:
        if dim == 0:
            return read_narrow(self.loaded, 0, self.start + start, length)
        return read_narrow(self.materialize(), dim, start, length)

    def materialize(self) -> Any:
        return read_narrow(self.loaded, 0, self.start, self.shape[0])


def _rows(tensor: Any, start: int, length: int) -> Any:
    """Rows `[start, start + length)` of a fused tensor: a view of a GGUF file's blocks
    (`attn_qkv`, `ffn_up`), or a lazy range of a safetensors tensor."""
    from shardline.model.gguf_weights import GGUFTensor

    if isinstance(tensor, GGUFTensor):
        return tensor.narrow(0, start, length)
    return RowRange(tensor, start, length)


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 / Phi-3.5 / Phi-4-mini text models (longrope rope scaling for the long variants)."""

    def expand_checkpoint_tensor(self, name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
        config = self.config
        if name.endswith("self_attn.qkv_proj.weight"):
            head_dim = head_dim_of(config)
            q = config.num_attention_heads * head_dim
            kv = (
                getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            ) * head_dim
            prefix = name.removesuffix("qkv_proj.weight")
            yield prefix + "q_proj.weight", _rows(tensor, 0, q)
            yield prefix + "k_proj.weight", _rows(tensor, q, kv)
            yield prefix + "v_proj.weight", _rows(tensor, q + kv, kv)
        elif name.endswith("mlp.gate_up_proj.weight"):
            size = config.intermediate_size
            prefix = name.removesuffix("gate_up_proj.weight")
            yield prefix + "gate_proj.weight", _rows(tensor, 0, size)
            yield prefix + "up_proj.weight", _rows(tensor, size, size)
        else:
            yield name, tensor
