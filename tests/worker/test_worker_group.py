"""Two spawned ranks (TP=2, and PP=2) over shm channels and gloo give HF's greedy tokens."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import socket

import anyio
import pytest
import torch

from shardline.transport import open_engine_channels
from shardline.transport.messages import (
    CachedRequest,
    ExecuteStep,
    Heartbeat,
    Hello,
    NewRequest,
    SamplingOptions,
    Shutdown,
    StepResult,
    WorkerReady,
)
from shardline.worker.config import WorkerConfig
from shardline.worker.main import run_worker

PROMPT = [5, 17, 33, 2, 90, 41, 7]
NUM_NEW = 4
BLOCK_SIZE = 4
# The tiny Llama (2 layers, 2 KV heads of 16, float32) split in two either way: per rank
# 2 * BLOCK_SIZE * 16 * 4 bytes for each of 2 (layer, KV head) pairs.
BYTES_PER_BLOCK = 2 * (2 * BLOCK_SIZE * 16 * 4)
GREEDY = SamplingOptions(
    temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, presence_penalty=0.0,
    frequency_penalty=0.0, repetition_penalty=1.0, num_logprobs=None,
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hf_greedy(model_dir: pathlib.Path) -> list[int]:
    from support.hf_reference import hf_causal_lm

    hf = hf_causal_lm(model_dir)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        gen = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW,
            min_new_tokens=NUM_NEW, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return [int(t) for t in gen[0, len(PROMPT) :]]


@pytest.mark.parametrize(("tp_size", "pp_size"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
async def test_two_ranks_generate_hf_tokens(
    tiny_llama_dir: pathlib.Path, tp_size: int, pp_size: int
) -> None:
    expected = hf_greedy(tiny_llama_dir)
    world = tp_size * pp_size
    output_rank = (pp_size - 1) * tp_size
    init_method = f"tcp://127.0.0.1:{free_port()}"
    processes: list[multiprocessing.process.BaseProcess] = []
    async with await open_engine_channels("shm", world) as channels:
        for rank in range(world):
            config = WorkerConfig(
                rank=rank, world_size=world, tp_size=tp_size, pp_size=pp_size,
                channels_address=channels.address, dist_init_method=init_method,
                model_path=str(tiny_llama_dir), block_size=BLOCK_SIZE,
                kv_cache_memory_bytes=24 * BYTES_PER_BLOCK * (1 + rank), max_model_len=64,
                max_num_seqs=4, parent_pid=os.getpid(), num_threads=1,
            )  # fmt: skip
            process = multiprocessing.get_context("spawn").Process(
                target=run_worker, args=(config.to_dict(),)
            )
            process.start()
            processes.append(process)
        try:
            with anyio.fail_after(180):
                ready: dict[int, int] = {}
                hellos = 0
                while len(ready) < world:
                    rank, msg = await channels.recv()
                    hellos += isinstance(msg, Hello)
                    if isinstance(msg, WorkerReady):
                        ready[rank] = msg.num_kv_blocks
                assert hellos == world
                # Rank 0's budget holds 24 blocks, rank 1's 48: they agree on the minimum.
                assert ready == dict.fromkeys(range(world), 24)

                tokens: list[int] = []
                blocks = [0, 1]
                await channels.broadcast(
                    ExecuteStep(
                        0, [NewRequest("r", PROMPT, GREEDY, blocks, 0, len(PROMPT))], [], []
                    )
                )
                for step_id in range(1, NUM_NEW + 1):
                    rank, msg = await channels.recv()
                    while isinstance(msg, Heartbeat):
                        rank, msg = await channels.recv()
                    assert isinstance(msg, StepResult) and rank == output_rank
                    assert msg.step_id == step_id - 1
                    tokens += msg.sampled_token_ids
                    if step_id == NUM_NEW:
                        break
                    num_computed = len(PROMPT) + len(tokens) - 1
                    new_blocks = [len(blocks)] if num_computed % BLOCK_SIZE == 0 else []
                    blocks += new_blocks
                    # A group without pipeline stages keeps its sampled tokens (every TP rank
                    # samples); with stages, the engine sends each token back.
                    sent = [] if pp_size == 1 else tokens[-1:]
                    cached = CachedRequest("r", sent, new_blocks, num_computed, 1, False)
                    await channels.broadcast(ExecuteStep(step_id, [], [cached], []))
                assert tokens == expected
                await channels.broadcast(Shutdown())
            for process in processes:
                await anyio.to_thread.run_sync(process.join, 60)
            assert [p.exitcode for p in processes] == [0] * world
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
