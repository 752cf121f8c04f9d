"""CUDA graphs for decode batches: capture the decoder forward once per batch size, replay it.

A decode step of a small model on a GPU is bound by kernel launches (hundreds of small kernels
per step, each a few microseconds of Python and driver work), not by the GPU. Replaying a
captured graph launches them all at once. What makes a step capturable:

* static shapes: a decode batch of ``n`` requests runs the graph of the smallest captured size
  ``>= n``; rows past ``n`` are padding that writes its K/V into a scratch block no request owns
  and attends over one token of it;
* static metadata: each batch size is captured once per key-length bucket (``kv_buckets``:
  16 blocks, doubling, up to ``max_model_len``); a step replays the graph of the smallest
  bucket that holds its longest request, and the mask hides the keys a request does not have.
  A graph that always attended over ``max_model_len`` keys spent most of a short-context step
  gathering and attending over padding;
* static addresses: inputs are copied into buffers the graph was captured with.

Prefill, mixed and oversized batches, pipeline stages and multi-rank groups run eagerly. The
LM head stays outside the graph (it runs on the sampled rows only).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from typing import Any

import torch

from shardline.model.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def kv_buckets(max_blocks: int, smallest: int = 16) -> list[int]:
    """Key lengths, in blocks, to capture: ``smallest``, doubling, and ``max_blocks`` last."""
    buckets = []
    blocks = max(1, min(smallest, max_blocks))
    while blocks < max_blocks:
        buckets.append(blocks)
        blocks *= 2
    return buckets + [max_blocks]


def capture_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 16 up to the batch limit."""
    top = max(1, min(max_num_seqs, limit))
    sizes = [s for s in (1, 2, 4, 8) if s <= top]
    sizes += list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class CudaGraphDecoder:
    """Wraps a model: decode-only batches replay a captured graph, anything else runs eagerly.

    ``pad_block`` must be a KV block no request is ever given (the runner allocates one extra).
    """

    def __init__(self, model: Any, *, block_size: int, max_model_len: int, max_num_seqs: int,
                 pad_block: int, device: torch.device, smallest_bucket: int = 16) -> None:
        self.model = model
        self.block_size = block_size
        self.pad_block = pad_block
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks = math.ceil(max_model_len / block_size)
        self.buckets = kv_buckets(self.max_blocks, smallest_bucket)
        self.max_model_len = max_model_len
        top = self.sizes[-1]

        def buffer(*shape: int, fill: int = 0, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids = buffer(top)
        self.positions = buffer(top)
        self.slot_mapping = buffer(top, fill=pad_block * block_size)
        self.seq_lens = buffer(top, fill=1, dtype=torch.int32)
        self.context_lens = buffer(top, dtype=torch.int32)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.block_tables = buffer(top, self.max_blocks, fill=pad_block, dtype=torch.int32)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _metadata(self, size: int, blocks: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size, :blocks],
            max_query_len=1,
            max_seq_len=blocks * self.block_size,
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[1] * size,
            block_size=self.block_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per batch size and key-length bucket, largest first, all sharing one
        memory pool."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                for blocks in reversed(self.buckets):
                    ids, positions = self.input_ids[:size], self.positions[:size]
                    for _ in range(2):  # warm-up: lazy inits and allocator state before capture
                        self.model(ids, positions, self._metadata(size, blocks))
                    graph = torch.cuda.CUDAGraph()
                    # Fresh metadata: what the layers derive from it per step (AttentionMetadata.
                    # derived) must be computed inside the graph, not reused from the warm-up.
                    attn = self._metadata(size, blocks)
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        out = self.model(ids, positions, attn)
                    self.graphs[size, blocks] = (graph, out)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs in %.1f s: decode batch sizes %s x key lengths %s",
                    len(self.graphs), time.perf_counter() - started, self.sizes,
                    [blocks * self.block_size for blocks in self.buckets])

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                 intermediate_tensors: Any = None) -> Any:
        num = input_ids.shape[0]
        if (intermediate_tensors is not None or attn.max_query_len != 1 or num != attn.num_seqs
                or num > self.sizes[-1] or attn.max_seq_len > self.max_model_len
                or attn.block_tables.shape[1] > self.max_blocks):
            return self.model(input_ids, positions, attn, intermediate_tensors)
        size, blocks = self._load_inputs(input_ids, positions, attn)
        captured = self.graphs.get((size, blocks))
        if captured is None:  # not captured (CPU tests): the same static step, run eagerly
            attn = self._metadata(size, blocks)
            attn.block_tables = attn.block_tables.contiguous()  # the CPU kernel takes no views
            return self.model(self.input_ids[:size], self.positions[:size], attn)[:num]
        graph, out = captured
        graph.replay()
        return out[:num]

    def _load_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     attn: AttentionMetadata) -> tuple[int, int]:
        """Copy a decode batch into the static buffers, pad it; returns the padded size and the
        key-length bucket (in blocks) that holds its longest request."""
        num = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, num)]
        needed = -(-attn.max_seq_len // self.block_size)
        blocks = self.buckets[bisect.bisect_left(self.buckets, needed)]
        width = min(attn.block_tables.shape[1], blocks)  # columns past the longest request: padding
        self.input_ids[:num].copy_(input_ids)
        self.positions[:num].copy_(positions)
        self.slot_mapping[:num].copy_(attn.slot_mapping)
        self.seq_lens[:num].copy_(attn.seq_lens)
        self.block_tables[:num, :width].copy_(attn.block_tables[:, :width])
        if num < size:  # padding rows: one token in the scratch block
            self.input_ids[num:size].zero_()
            self.positions[num:size].zero_()
            self.slot_mapping[num:size].fill_(self.pad_block * self.block_size)
            self.seq_lens[num:size].fill_(1)
            self.block_tables[num:size, 0].fill_(self.pad_block)
        return size, blocks

    def __getattr__(self, name: str) -> Any:  # the rest of the model contract (compute_logits, ...)
        return getattr(self.__dict__["model"], name)
