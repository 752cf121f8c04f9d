"""Sizing and allocating this rank's paged KV cache.

Each local :class:`model.attention.Attention` layer gets one tensor
``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (local heads after TP, local layers
after PP) of the KV dtype (`EngineConfig.kv_cache_dtype`: the model's, or float16/bfloat16,
or float8 on CUDA), whose element size the budget is divided by: a 16-bit cache holds twice the
blocks of a float32 one in the same bytes. Block ids are shared by every rank, so all ranks use
the minimum block count.
"""

from __future__ import annotations

import math
import threading

import psutil
import torch
import torch.distributed as dist
from torch import nn

from shardline.model.attention import Attention
from shardline.model.memory import huge_page_zeros, populate_in_background

# Without an explicit budget: on CPU enough for one sequence of max_model_len tokens, and at
# least CPU_DEFAULT_BYTES (so the default model, weights, KV and both processes stay within
# ~1 GiB); on CUDA what `gpu_memory_utilization` of the device leaves after the weights.
CPU_DEFAULT_BYTES = 256 << 20
CPU_MAX_FRACTION = 0.25  # of the available RAM, shared by the local workers: a default never passes it
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Never more blocks than every sequence at full length (plus slack) could ever use.
MAX_BLOCKS_ABSOLUTE = 1 << 20


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's local attention layers, in module order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(layers: list[Attention], block_size: int, dtype: torch.dtype) -> int:
    """KV bytes one block takes summed over the local layers, in a cache of `dtype`."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return sum(
        2 * block_size * layer.num_kv_heads * layer.head_dim * element_size for layer in layers
    )


def memory_budget(device: torch.device, local_world_size: int, explicit: int | None, *,
                  one_sequence: int = 0, gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> int:
    """Bytes this rank may spend on its KV cache: `explicit` when given; on CUDA the share of
    the device's memory `gpu_memory_utilization` allows minus what is in use after loading
    (as vLLM's `--gpu-memory-utilization`); on CPU `one_sequence` (the bytes of one full-length
    sequence) but at least CPU_DEFAULT_BYTES, capped at a quarter of the available RAM."""
    if explicit is not None:
        if explicit <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {explicit}")
        return explicit
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * gpu_memory_utilization) - (total - free)
        if budget <= 0:
            raise ValueError(
                f"gpu_memory_utilization={gpu_memory_utilization} leaves no memory for the KV cache: "
                f"{(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB are in use after loading"
            )
        return budget
    available = psutil.virtual_memory().available
    cap = int(available * CPU_MAX_FRACTION) // max(1, local_world_size)
    return min(max(CPU_DEFAULT_BYTES, one_sequence), cap)


def determine_num_blocks(
    model: nn.Module,
    *,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_kv_blocks: int | None,
    kv_cache_memory_bytes: int | None,
    max_model_len: int,
    max_num_seqs: int,
    local_world_size: int = 1,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
) -> int:
    """This rank's block count: the configured one, or what the budget holds (capped)."""
    if num_kv_blocks is not None:
        if num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {num_kv_blocks}")
        return num_kv_blocks
    layers = attention_layers(model)
    per_block = bytes_per_block(layers, block_size, dtype)
    if per_block == 0:  # a stage without attention layers (not expected): no constraint here
        return MAX_BLOCKS_ABSOLUTE
    one_sequence = math.ceil(max_model_len / block_size) * per_block
    budget = memory_budget(device, local_world_size, kv_cache_memory_bytes, one_sequence=one_sequence,
                           gpu_memory_utilization=gpu_memory_utilization)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds no block of {per_block} bytes; "
            "raise kv_cache_memory_bytes (or gpu_memory_utilization) or lower block_size"
        )
    useful = max_num_seqs * math.ceil(max_model_len / block_size) + max_num_seqs
    return int(min(num_blocks, useful, MAX_BLOCKS_ABSOLUTE))


def agree_num_blocks(num_blocks: int, device: torch.device) -> int:
    """The minimum block count over the whole torch.distributed world (identity without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return num_blocks
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
    tensor_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([num_blocks], dtype=torch.int64, device=tensor_device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, *, block_size: int, dtype: torch.dtype, device: torch.device,
    populate: bool = True,
) -> int:
    """Give each local Attention layer its cache tensor; returns the bytes allocated.

    On CPU `populate` commits every page now; False leaves that to `commit_kv_cache`, which a
    worker runs in the background once it is ready."""
    total = 0
    for layer in attention_layers(model):
        shape = (num_blocks, 2, block_size, layer.num_kv_heads, layer.head_dim)
        if device.type == "cpu":
            # Huge pages spare decode attention's stream the TLB; populated now, because a
            # page first touched inside a step costs that step a fault (model/memory.py).
            cache = huge_page_zeros(shape, dtype, populate=populate)
        else:
            cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.kv_cache = cache
        total += cache.numel() * cache.element_size()
    return total


def commit_kv_cache(model: nn.Module) -> threading.Thread | None:
    """Commit the CPU KV cache's pages on a background thread (see `allocate_kv_cache`)."""
    caches = [layer.kv_cache for layer in attention_layers(model)
              if layer.kv_cache.device.type == "cpu" and layer.kv_cache.numel()]
    return populate_in_background(caches, name="shardline-kv-commit")
