"""Per-request worker state and the flattening of one step into model input tensors.

A step schedules tokens ``[num_computed, num_computed + num_scheduled)`` of each request. They
are laid out back to back (``query_start_loc``); each token's KV slot is
``block_table[pos // block_size] * block_size + pos % block_size``. Python work per step is
proportional to the *scheduled* tokens and the number of requests; block tables live in
growing tensors so nothing walks a request's whole context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shardline.model.attention import AttentionMetadata
from shardline.worker.sampler import RequestSamplingState


class BlockTable:
    """A request's KV block ids in a growing int32 numpy buffer (amortised O(1) appends).

    numpy rather than torch: a step copies every scheduled request's table into one matrix,
    and a numpy slice assignment costs a fraction of a torch one at these sizes.
    """

    def __init__(self, block_ids: Sequence[int] = ()) -> None:
        self._buffer = np.zeros(max(16, len(block_ids)), dtype=np.int32)
        self.num_blocks = 0
        self.append(block_ids)

    def append(self, block_ids: Sequence[int]) -> None:
        """Add block ids at the end of the table."""
        if not block_ids:
            return
        needed = self.num_blocks + len(block_ids)
        if needed > self._buffer.size:
            grown = np.zeros(max(needed, 2 * self._buffer.size), dtype=np.int32)
            grown[: self.num_blocks] = self._buffer[: self.num_blocks]
            self._buffer = grown
        self._buffer[self.num_blocks : needed] = block_ids
        self.num_blocks = needed

    def replace(self, block_ids: Sequence[int]) -> None:
        """Make ``block_ids`` the whole table (a request resumed after preemption)."""
        self.num_blocks = 0
        self.append(block_ids)

    def truncate(self, num_blocks: int) -> None:
        """Keep the first ``num_blocks`` ids (speculative decoding: rejected drafts' blocks)."""
        self.num_blocks = min(self.num_blocks, num_blocks)

    def array(self) -> np.ndarray:
        """A view of the current ids (int32 numpy)."""
        return self._buffer[: self.num_blocks]

    def tensor(self) -> torch.Tensor:
        """A view of the current ids (int32, CPU)."""
        return torch.from_numpy(self.array())

    def tolist(self) -> list[int]:
        """The ids as a list (for tests and logs)."""
        return [int(b) for b in self.array().tolist()]


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
    # prompt_logprobs k (last pipeline stage only), and the next prompt position to score:
    # positions before it were reported already (a recomputed chunk does not report again).
    prompt_logprobs: int | None = None
    prompt_logprobs_next: int = 1

    def append_tokens(self, token_ids: Sequence[int]) -> None:
        """Tokens the engine sampled in earlier steps, in order."""
        self.token_ids.extend(token_ids)
        self.num_output_tokens += len(token_ids)
        if self.sampling is not None:
            self.sampling.append_output(token_ids)


@dataclass(slots=True)
class ScheduledChunk:
    """One request's share of a step: compute ``num_scheduled`` tokens after ``num_computed``.

    Treat as read-only; not frozen only because a frozen dataclass's __init__ costs ~3x more,
    and the worker builds one per scheduled request per step.
    """

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
    """Flatten scheduled chunks into input ids, positions and attention metadata.

    The index arithmetic runs in numpy (one small array op costs far less than a torch op
    on CPU); the results become torch tensors without copies before moving to `device`.
    """
    if not chunks:
        raise ValueError("a step needs at least one scheduled request")
    num_seqs = len(chunks)
    query_lens: list[int] = []
    context_lens: list[int] = []
    input_list: list[int] = []
    sample_rows: list[int] = []
    tables: list[np.ndarray] = []
    max_blocks = 0
    for row, chunk in enumerate(chunks):
        state = chunk.state
        start, count = chunk.num_computed, chunk.num_scheduled
        end = start + count
        num_known = len(state.token_ids)
        if count <= 0 or start < 0 or end > num_known:
            raise ValueError(
                f"request {state.req_id!r}: cannot compute tokens [{start}, {end}) "
                f"of {num_known}"
            )
        table = state.block_table
        if end > table.num_blocks * block_size:
            raise ValueError(
                f"request {state.req_id!r}: {end} tokens need more than its "
                f"{table.num_blocks} blocks of {block_size}"
            )
        query_lens.append(count)
        context_lens.append(start)
        if count == 1:
            input_list.append(state.token_ids[start])
        else:
            input_list.extend(state.token_ids[start:end])
        if end == num_known:
            sample_rows.append(row)
        tables.append(table.array())
        if table.num_blocks > max_blocks:
            max_blocks = table.num_blocks

    query_lens_np = np.array(query_lens, dtype=np.int64)
    context_lens_np = np.array(context_lens, dtype=np.int64)
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens_np, out=query_start_loc[1:])
    seq_lens_np = context_lens_np + query_lens_np
    num_tokens = int(query_start_loc[-1])

    if num_tokens == num_seqs:  # a pure decode step: one token per request
        positions = context_lens_np
        seq_index = np.arange(num_seqs)
    else:
        # Position of each token = its index minus its request's start plus the cached context.
        offsets = np.repeat(context_lens_np - query_start_loc[:-1], query_lens_np)
        positions = np.arange(num_tokens, dtype=np.int64) + offsets
        seq_index = np.repeat(np.arange(num_seqs), query_lens_np)

    block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
    for row, table_ids in enumerate(tables):
        block_tables[row, : table_ids.size] = table_ids
    block_ids = block_tables[seq_index, positions // block_size].astype(np.int64)
    slot_mapping = block_ids * block_size + positions % block_size
    sample_indices = query_start_loc[1:][sample_rows] - 1

    def to_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    attn = AttentionMetadata(
        slot_mapping=to_device(slot_mapping),
        query_start_loc=to_device(query_start_loc.astype(np.int32)),
        seq_lens=to_device(seq_lens_np.astype(np.int32)),
        context_lens=to_device(context_lens_np.astype(np.int32)),
        block_tables=to_device(block_tables),
        max_query_len=max(query_lens),
        max_seq_len=int(seq_lens_np.max()),
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens_np.tolist(),
        block_size=block_size,
    )
    return StepInputs(
        input_ids=torch.tensor(input_list, dtype=torch.int64).to(device, non_blocking=True),
        positions=to_device(positions),
        attn=attn,
        sample_indices=to_device(sample_indices),
        sample_states=[chunks[row].state for row in sample_rows],
    )
