"""Build a model through the registry and fill it from a checkpoint.

Hugging Face safetensors (one file, or shards with `model.safetensors.index.json`) are read
lazily: each tensor is handed to the model as a `LazySlice`, and a parameter's weight loader
reads only the rows/columns of its own shard from disk, so a TP rank never materializes the
full tensors. GGUF tensors come as `gguf_weights.GGUFTensor` views of the file's blocks.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from shardline.model.config import ModelConfig
from shardline.model.errors import CheckpointError
from shardline.model.parallel_context import ParallelContext
from shardline.model.registry import ModelRegistry, check_model_interface


@dataclass
class LoadStats:
    """What a load read: tensors seen and bytes actually materialized from the checkpoint."""

    num_tensors: int = 0
    bytes_read: int = 0


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


class LazySlice:
    """One safetensors tensor, read from disk with plain positioned reads only as far as
    `narrow` / `materialize` ask (no mmap: page-faulting a mapping is several times slower
    than reading, and a rank must not hold more than its shard)."""

    def __init__(self, handle: BinaryIO, name: str, file: str, dtype: torch.dtype,
                 shape: tuple[int, ...], offset: int, stats: LoadStats) -> None:
        self._handle = handle
        self.name = name
        self.file = file
        self.dtype = dtype
        self.shape = shape
        self._offset = offset
        self._stats = stats

    def _read_rows(self, out: torch.Tensor, first_row: int) -> None:
        """Fill the contiguous `out` with rows starting at `first_row` (rows along dim 0)."""
        row_bytes = out[0].numel() * out.element_size() if out.dim() else out.element_size()
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else None  # type: ignore[arg-type]
        if view is None:
            return
        if self._handle.closed:
            raise CheckpointError(
                f"tensor {self.name!r} was read after its file {self.file!r} was closed; read a "
                "LazySlice while iterating, or iterate with lazy=False"
            )
        self._handle.seek(self._offset + first_row * row_bytes)
        got = self._handle.readinto(view)  # type: ignore[attr-defined]
        if got != len(view):
            raise CheckpointError(
                f"tensor {self.name!r} in {self.file!r} is truncated (read {got} of {len(view)} bytes)"
            )

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not self.shape or not 0 <= start <= start + length <= self.shape[dim]:
            raise CheckpointError(
                f"cannot take [{start}:{start + length}] along dim {dim} of tensor {self.name!r} "
                f"of shape {list(self.shape)}"
            )
        shape = list(self.shape)
        shape[dim] = length
        out = torch.empty(shape, dtype=self.dtype)
        if dim == 0:
            self._read_rows(out, start)
        else:  # a column shard: read bounded blocks of whole rows and keep our columns
            rows_per_block = max(1, (8 << 20) // max(1, self._row_nbytes()))
            for first in range(0, self.shape[0], rows_per_block):
                count = min(rows_per_block, self.shape[0] - first)
                block = torch.empty([count, *self.shape[1:]], dtype=self.dtype)
                self._read_rows(block, first)
                out[first:first + count] = block.narrow(dim, start, length)
        self._stats.bytes_read += out.numel() * out.element_size()
        return out

    def _row_nbytes(self) -> int:
        count = 1
        for size in self.shape[1:]:
            count *= size
        return count * torch.empty(0, dtype=self.dtype).element_size()

    def materialize(self) -> torch.Tensor:
        if not self.shape:
            out = torch.empty([1], dtype=self.dtype)
            self._read_rows(out, 0)
            self._stats.bytes_read += out.element_size()
            return out.reshape(())
        return self.narrow(0, 0, self.shape[0])

    def __repr__(self) -> str:
        return f"LazySlice({self.name!r}, shape={list(self.shape)})"


def read_safetensors_header(handle: BinaryIO, file: str) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """{name: (dtype, shape, absolute data offset)}, validated against the file's size."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"corrupt safetensors file {file!r}: {why}")

    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    if len(prefix) != 8:
        raise corrupt("shorter than its 8-byte header length")
    header_len = struct.unpack("<Q", prefix)[0]
    if header_len > min(size - 8, _MAX_HEADER):
        raise corrupt(f"header length {header_len} exceeds the file")
    try:
        header = json.loads(handle.read(header_len))
    except ValueError as exc:
        raise corrupt(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise corrupt(f"bad header entry for {name!r}: {info!r}") from exc
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if end - begin != nbytes or data_start + end > size:
            raise corrupt(
                f"tensor {name!r} ({info['dtype']} {list(shape)}) has data offsets {[begin, end]} "
                f"that do not fit its shape or the file ({size} bytes)"
            )
        out[name] = (dtype, shape, data_start + begin)
    return out


def load_model(model_config: ModelConfig, parallel_context: ParallelContext,
               stats: LoadStats | None = None, skip_weights: Collection[str] = ()) -> nn.Module:
    """Build `model_config.architecture` for this rank, load its shards, move to device, eval.

    `skip_weights`: parameter names whose values are not needed (a packed copy of them comes
    from elsewhere): on a model that declares `supports_skip_weights`, they become meta tensors
    of their shape and are never read; other models load everything."""
    stats = stats if stats is not None else LoadStats()
    builder = ModelRegistry.resolve(model_config.architecture)
    with parallel_context.device:
        model = builder(model_config, parallel_context)
    check_model_interface(model, model_config.architecture)
    skipping = bool(skip_weights) and bool(getattr(model, "supports_skip_weights", False))
    if skipping:
        if parallel_context.device.type != "cpu":
            raise ValueError("skip_weights is for CPU models (packed weights)")
        for name in skip_weights:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            param = getattr(module, attr)
            setattr(module, attr, nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                               requires_grad=False))
    lazy_ok = bool(getattr(model, "supports_lazy_weights", False))
    with torch.no_grad():
        model.load_weights(iter_weights(model_config, stats, lazy=lazy_ok))
        if model_config.gguf_file and isinstance(model, nn.Module):
            from shardline.model.gguf_weights import finish_gguf_load

            skipping = finish_gguf_load(model) > 0 or skipping  # GGUF layers hold meta weights
    if isinstance(model, nn.Module):
        # Built on the device already; `to` would try to copy the skipped (meta) weights.
        (model if skipping else model.to(parallel_context.device)).eval()
    return model


def iter_weights(model_config: ModelConfig, stats: LoadStats | None = None,
                 lazy: bool = True) -> Iterator[tuple[str, Any]]:
    """(Hugging Face name, tensor) for every tensor of the checkpoint, in file order."""
    stats = stats if stats is not None else LoadStats()
    if model_config.gguf_file:
        yield from iter_gguf(model_config.gguf_file, model_config.hf_config, stats)
        return
    for name, tensor in iter_safetensors(pathlib.Path(model_config.path), stats):
        yield name, (tensor if lazy else tensor.materialize())


def safetensors_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's shard files, via the index when there is one."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"corrupt safetensors index {str(index)!r}: {exc}") from exc
        files = [root / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"safetensors index names missing shard file(s): {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {str(root)!r}")
    return files


def iter_safetensors(root: pathlib.Path, stats: LoadStats) -> Iterator[tuple[str, LazySlice]]:
    for file in safetensors_files(root):
        with open(file, "rb", buffering=0) as handle:
            entries = read_safetensors_header(handle, str(file))
            for name, (dtype, shape, offset) in sorted(entries.items(), key=lambda e: e[1][2]):
                stats.num_tensors += 1
                yield name, LazySlice(handle, name, str(file), dtype, shape, offset, stats)


# GGUF tensor names (llama.cpp) -> Hugging Face names.
_GGUF_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Qwen3's q/k norms; the MoE router and Qwen2-MoE's shared expert (issue 24)
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3's fused projections (its ffn_up is gate + up)
    "post_attention_norm": "post_attention_layernorm",  # Gemma's sandwich norms
    "post_ffw_norm": "post_feedforward_layernorm",
}
# MoE experts come stacked `[num_experts, rows, cols]`: split into each expert's projection.
_GGUF_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# rope frequency factors: read into the config's rope settings (config.py), not weights
_GGUF_SKIP = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name`; None for tensors we do not load."""
    if name in _GGUF_SKIP:
        return None
    match = _GGUF_BLOCK.match(name)
    if match:
        layer, part, kind = match.groups()
        if part in _GGUF_EXPERTS and kind == "weight":
            return f"model.layers.{layer}.mlp.experts.{{}}.{_GGUF_EXPERTS[part]}.weight"
        if part in _GGUF_LAYER:
            return f"model.layers.{layer}.{_GGUF_LAYER[part]}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _GGUF_GLOBAL and kind in ("weight", "bias"):
            return f"{_GGUF_GLOBAL[base]}.{kind}"
    raise CheckpointError(f"GGUF tensor {name!r} has no counterpart in the models shardline runs")


def _unpermute_rope_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split rotary layout)."""
    half = weights.shape[0] // num_heads // 2
    shaped = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return shaped.swapaxes(2, 1).reshape(weights.shape)


def iter_gguf(path: str, hf_config: Any, stats: LoadStats) -> Iterator[tuple[str, Any]]:
    """A GGUF file's tensors under Hugging Face names: each 2-D one as a `GGUFTensor` (its
    blocks, a view of a copy-on-write mapping of the file; q/k rows read and reordered), 1-D
    ones (norms, biases) as float32."""
    from shardline.model.gguf_weights import gguf_files

    arch = getattr(hf_config, "model_type", None) or "llama"
    for file in gguf_files(path):  # the parts of a split model, in order
        yield from _iter_gguf_file(file, arch, hf_config, stats)


def _iter_gguf_file(path: str, arch: str, hf_config: Any, stats: LoadStats) -> Iterator[tuple[str, Any]]:
    from shardline.model.gguf_reader import open_reader
    from shardline.model.gguf_weights import GGUFTensor, read_rows

    try:
        reader = open_reader(path, "c")
    except Exception as exc:  # the reader raises ValueError/struct/numpy errors on bad bytes
        raise CheckpointError(f"corrupt GGUF file {path!r}: {exc}") from exc
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    moe_name = "block_sparse_moe" if "MixtralForCausalLM" in (hf_config.architectures or ()) else "mlp"
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        dims = [int(d) for d in reversed(tensor.shape.tolist())]
        stats.num_tensors += 1
        if arch == "phi3" and hf_name.endswith("mlp.up_proj.weight"):
            hf_name = hf_name.replace("mlp.up_proj", "mlp.gate_up_proj")
        if arch in ("gemma2", "gemma3") and tensor.name.endswith(".ffn_norm.weight"):  # Gemma's 4 norms a layer
            hf_name = hf_name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
        if moe_name != "mlp" and (".mlp.experts." in hf_name or hf_name.endswith(".mlp.gate.weight")):
            hf_name = hf_name.replace(".mlp.", f".{moe_name}.")  # Mixtral's block_sparse_moe
        if len(dims) == 3 and "{}" in hf_name:
            yield from _split_experts(tensor, hf_name, dims, path, stats)
            continue
        if len(dims) == 2:
            shape = (dims[0], dims[1])
            permute = arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight"))
            if permute:
                heads = num_heads if "q_proj" in hf_name else num_kv_heads
                order = _unpermute_rope_rows(np.arange(shape[0]), heads)
                out = read_rows(path, tensor.name, int(tensor.tensor_type), shape, int(tensor.data_offset), order)
            else:
                raw = np.asarray(tensor.data).view(np.uint8).reshape(shape[0], -1)
                out = GGUFTensor(tensor.name, int(tensor.tensor_type), shape, torch.from_numpy(raw))
            stats.bytes_read += out.nbytes
            yield hf_name, out
            continue
        data = _dequantize(tensor, dims, path, stats)
        if arch in ("gemma2", "gemma3") and "norm" in hf_name:
            data -= 1.0  # llama.cpp stores Gemma's norms as 1 + w (the checkpoint holds w)
        if hf_name.endswith("shared_expert_gate.weight") and data.ndim == 1:
            data = data[None, :]  # llama.cpp stores the shared expert's gate as a vector
        yield hf_name, torch.from_numpy(data)


def _dequantize(tensor: Any, dims: list[int], path: str, stats: LoadStats) -> np.ndarray:
    """A GGUF tensor's values as a float32 array of shape `dims`."""
    import gguf

    try:
        data = gguf.dequantize(tensor.data, tensor.tensor_type)
        data = np.array(data, dtype=np.float32, copy=True).reshape(dims)
    except Exception as exc:
        raise CheckpointError(f"corrupt GGUF tensor {tensor.name!r} in {path!r}: {exc}") from exc
    stats.bytes_read += data.nbytes
    return data


def _split_experts(tensor: Any, name_pattern: str, dims: list[int], path: str,
                   stats: LoadStats) -> Iterator[tuple[str, Any]]:
    """A stacked MoE expert tensor (`ffn_gate_exps` ...: `[experts, rows, cols]`) as each
    expert's float32 projection (`...experts.{e}.gate_proj.weight`)."""
    data = _dequantize(tensor, dims, path, stats)
    for expert in range(dims[0]):
        yield name_pattern.format(expert), torch.from_numpy(data[expert])


def map_embedding(model: nn.Module, model_config: ModelConfig, parallel_context: ParallelContext) -> int:
    """Point a single-rank CPU model's token embedding at its bytes in the safetensors file
    (a private, copy-on-write mapping) instead of a copy in memory; returns the bytes mapped
    (0 where it does not apply: GGUF, tensor parallelism, another dtype, no such tensor).

    A lookup reads only its tokens' rows, so memory holds the rows prompts use rather than the
    whole table (SmolLM2: 113 MB). A tied LM head shares the parameter and keeps its own packed
    copy for the GEMM; without one, the head reads the mapping whole each step."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(embed, "weight", None)
    if (model_config.gguf_file or parallel_context.tp_size != 1 or parallel_context.device.type != "cpu"
            or not isinstance(weight, torch.Tensor) or weight.is_meta):
        return 0
    name = "model.embed_tokens.weight"
    for file in safetensors_files(pathlib.Path(model_config.path)):
        with open(file, "rb", buffering=0) as handle:
            entry = read_safetensors_header(handle, str(file)).get(name)
            if entry is None:
                continue
            dtype, shape, offset = entry
            if dtype != weight.dtype or tuple(shape) != tuple(weight.shape) or offset % weight.element_size():
                return 0
            mapping = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mapped = torch.frombuffer(mapping, dtype=dtype, count=weight.numel(), offset=offset).view(shape)
        weight.data = mapped  # the same Parameter: a tied head sees it too
        return weight.numel() * weight.element_size()
    return 0
