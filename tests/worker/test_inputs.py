"""build_step_inputs: positions, slot mapping and metadata of a hand-checked step."""

from __future__ import annotations

import pytest
import torch

from shardline.worker.inputs import BlockTable, RequestState, ScheduledChunk, build_step_inputs


def state(req_id: str, num_tokens: int, blocks: list[int]) -> RequestState:
    return RequestState(
        req_id, list(range(100, 100 + num_tokens)), num_tokens, BlockTable(blocks), 0
    )


def test_flattened_step_layout() -> None:
    prefill = state("p", 5, [7, 3])  # 5 prompt tokens, block size 4: slots 28..31, 12
    decode = state("d", 10, [1, 4, 9])  # 9 cached, computes position 9 -> block 9, offset 1
    partial = state("c", 8, [2, 6])  # chunk [2, 5): no sample
    chunks = [
        ScheduledChunk(prefill, 0, 5),
        ScheduledChunk(decode, 9, 1),
        ScheduledChunk(partial, 2, 3),
    ]
    inputs = build_step_inputs(chunks, block_size=4, device=torch.device("cpu"))

    assert inputs.input_ids.tolist() == [100, 101, 102, 103, 104, 109, 102, 103, 104]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 9, 2, 3, 4]
    attn = inputs.attn
    assert attn.slot_mapping.tolist() == [28, 29, 30, 31, 12, 37, 10, 11, 24]
    assert attn.query_start_loc.tolist() == [0, 5, 6, 9] == attn.query_start_loc_cpu
    assert attn.seq_lens.tolist() == [5, 10, 5] == attn.seq_lens_cpu
    assert attn.context_lens.tolist() == [0, 9, 2]
    assert attn.block_tables.tolist() == [[7, 3, 0], [1, 4, 9], [2, 6, 0]]
    assert attn.block_tables.dtype == torch.int32 and attn.slot_mapping.dtype == torch.int64
    assert (attn.max_query_len, attn.max_seq_len, attn.block_size) == (5, 10, 4)
    assert inputs.sample_indices.tolist() == [4, 5]
    assert [s.req_id for s in inputs.sample_states] == ["p", "d"]


def test_block_table_grows_and_is_replaced() -> None:
    table = BlockTable([1, 2])
    table.append(list(range(10, 40)))
    assert table.tolist() == [1, 2, *range(10, 40)]
    table.replace([5])
    assert table.tolist() == [5] and table.num_blocks == 1


def test_inconsistent_chunks_are_errors() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="cannot compute tokens"):
        build_step_inputs([ScheduledChunk(state("x", 3, [0]), 2, 2)], block_size=4, device=cpu)
    with pytest.raises(ValueError, match="more than its 1 blocks"):
        build_step_inputs([ScheduledChunk(state("y", 6, [0]), 0, 6)], block_size=4, device=cpu)
