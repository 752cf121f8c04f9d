"""Per-request worker state and the flattening of one step into model input tensors.

A step schedules tokens ``[num_computed, num_computed + num_scheduled)`` of each request. They
are laid out back to back (``query_start_loc``); each token's KV slot is
``block_table[pos // block_size] * block_size + pos % block_size``. Python work per step is
proportional to the *scheduled* tokens and the number of requests; block tables live in
growing tensors so nothing walks a request's whole context.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.attention import AttentionMetadata
from worker.sampler import RequestSamplingState


class BlockTable:
    """A request's KV block ids in a growing int32 tensor (amortised O(1) appends)."""

    def __init__(self, block_ids: Sequence[int] = ()) -> None:
        self._buffer = torch.zeros(max(16, len(block_ids)), dtype=torch.int32)
        self.num_blocks = 0
        self.append(block_ids)

    def append(self, block_ids: Sequence[int]) -> None:
        """Add block ids at the end of the table."""
        if not block_ids:
            return
        needed = self.num_blocks + len(block_ids)
        if needed > self._buffer.numel():
            grown = torch.zeros(max(needed, 2 * self._buffer.numel()), dtype=torch.int32)
            grown[: self.num_blocks] = self._buffer[: self.num_blocks]
            self._buffer = grown
        self._buffer[self.num_blocks : needed] = torch.tensor(block_ids, dtype=torch.int32)
        self.num_blocks = needed

    def replace(self, block_ids: Sequence[int]) -> None:
        """Make ``block_ids`` the whole table (a request resumed after preemption)."""
        self.num_blocks = 0
        self.append(block_ids)

    def tensor(self) -> torch.Tensor:
        """A view of the current ids (int32, CPU)."""
        return self._buffer[: self.num_blocks]

    def tolist(self) -> list[int]:
        """The ids as a list (for tests and logs)."""
        return [int(b) for b in self.tensor().tolist()]


@dataclass
class RequestState:
    """What a worker keeps per request between steps (docs/INTERFACES.md section 1)."""

    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: BlockTable
    num_computed_tokens: int
    sampling: RequestSamplingState | None = None  # only on the rank that samples
    num_output_tokens: int = field(default=0)

    def append_tokens(self, token_ids: Sequence[int]) -> None:
        """Tokens the engine sampled in earlier steps, in order."""
        self.token_ids.extend(token_ids)
        self.num_output_tokens += len(token_ids)
        if self.sampling is not None:
            self.sampling.append_output(token_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    """One request's share of a step: compute ``num_scheduled`` tokens after ``num_computed``."""

    state: RequestState
    num_computed: int
    num_scheduled: int


@dataclass(frozen=True)
class StepInputs:
    """The tensors of one step, on the model's device."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    attn: AttentionMetadata
    sample_indices: torch.Tensor  # int64 [N]: row of hidden for each sampling request
    sample_states: list[RequestState]  # the N sampling requests, in step order


def build_step_inputs(
    chunks: Sequence[ScheduledChunk], *, block_size: int, device: torch.device
) -> StepInputs:
    """Flatten scheduled chunks into input ids, positions and attention metadata."""
    if not chunks:
        raise ValueError("a step needs at least one scheduled request")
    query_lens: list[int] = []
    context_lens: list[int] = []
    token_slices: list[list[int]] = []
    max_blocks = 0
    for chunk in chunks:
        state = chunk.state
        end = chunk.num_computed + chunk.num_scheduled
        if chunk.num_scheduled <= 0 or chunk.num_computed < 0 or end > len(state.token_ids):
            raise ValueError(
                f"request {state.req_id!r}: cannot compute tokens [{chunk.num_computed}, {end}) "
                f"of {len(state.token_ids)}"
            )
        capacity = state.block_table.num_blocks * block_size
        if end > capacity:
            raise ValueError(
                f"request {state.req_id!r}: {end} tokens need more than its "
                f"{state.block_table.num_blocks} blocks of {block_size}"
            )
        query_lens.append(chunk.num_scheduled)
        context_lens.append(chunk.num_computed)
        token_slices.append(state.token_ids[chunk.num_computed : end])
        max_blocks = max(max_blocks, state.block_table.num_blocks)

    num_seqs = len(chunks)
    num_tokens = sum(query_lens)
    query_lens_t = torch.tensor(query_lens, dtype=torch.int64)
    context_lens_t = torch.tensor(context_lens, dtype=torch.int64)
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(query_lens_t, dim=0, out=query_start_loc[1:])
    seq_lens_t = context_lens_t + query_lens_t

    # Position of each token = its index minus its request's start plus the cached context.
    offsets = torch.repeat_interleave(context_lens_t - query_start_loc[:-1], query_lens_t)
    positions = torch.arange(num_tokens, dtype=torch.int64) + offsets
    seq_index = torch.repeat_interleave(torch.arange(num_seqs), query_lens_t)

    block_tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
    for row, chunk in enumerate(chunks):
        table = chunk.state.block_table
        block_tables[row, : table.num_blocks] = table.tensor()
    block_ids = block_tables[seq_index, positions // block_size].to(torch.int64)
    slot_mapping = block_ids * block_size + positions % block_size

    input_ids = torch.tensor(list(itertools.chain.from_iterable(token_slices)), dtype=torch.int64)
    sample_rows = [
        row
        for row, chunk in enumerate(chunks)
        if chunk.num_computed + chunk.num_scheduled == len(chunk.state.token_ids)
    ]
    sample_indices = query_start_loc[1:][sample_rows] - 1

    query_start_loc_cpu = query_start_loc.tolist()
    seq_lens_cpu = seq_lens_t.tolist()
    attn = AttentionMetadata(
        slot_mapping=slot_mapping.to(device, non_blocking=True),
        query_start_loc=query_start_loc.to(torch.int32).to(device, non_blocking=True),
        seq_lens=seq_lens_t.to(torch.int32).to(device, non_blocking=True),
        context_lens=context_lens_t.to(torch.int32).to(device, non_blocking=True),
        block_tables=block_tables.to(device, non_blocking=True),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens_cpu),
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens_cpu=seq_lens_cpu,
        block_size=block_size,
    )
    return StepInputs(
        input_ids=input_ids.to(device, non_blocking=True),
        positions=positions.to(device, non_blocking=True),
        attn=attn,
        sample_indices=sample_indices.to(device, non_blocking=True),
        sample_states=[chunks[row].state for row in sample_rows],
    )
