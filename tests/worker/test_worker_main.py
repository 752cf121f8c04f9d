"""The worker entry end to end: a spawned process over shm, and the in-process thread mode."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import signal
import sys
import threading

import anyio
import pytest
import torch

from shardline.transport import open_engine_channels
from shardline.transport.messages import (
    ExecuteStep,
    Heartbeat,
    Hello,
    Message,
    NewRequest,
    SamplingOptions,
    Shutdown,
    StepResult,
    WorkerError,
    WorkerReady,
)
from shardline.worker.config import WorkerConfig
from shardline.worker.main import Worker, run_worker
from support.leaks import our_shm_entries

PROMPT = [5, 17, 33, 2, 90, 41, 7]
GREEDY = SamplingOptions(
    temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, presence_penalty=0.0,
    frequency_penalty=0.0, repetition_penalty=1.0, num_logprobs=None,
)  # fmt: skip
STEP = ExecuteStep(0, [NewRequest("r0", PROMPT, GREEDY, [3, 4], 0, len(PROMPT))], [], [])


def hf_next_token(model_dir: pathlib.Path) -> int:
    from support.hf_reference import hf_causal_lm

    hf = hf_causal_lm(model_dir)
    with torch.no_grad():
        return int(hf(torch.tensor([PROMPT])).logits[0, -1].argmax())


def worker_config(address: dict[str, object], model_dir: str, **kw: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        rank=0, world_size=1, channels_address=address, model_path=model_dir, block_size=4,
        num_kv_blocks=16, parent_pid=os.getpid(), heartbeat_interval=0.2, num_threads=1,
    )  # fmt: skip
    fields.update(kw)
    return WorkerConfig(**fields).to_dict()  # type: ignore[arg-type]


async def recv_skipping_heartbeats(channels) -> Message:  # type: ignore[no-untyped-def]
    while True:
        rank, msg = await channels.recv()
        assert rank == 0
        if not isinstance(msg, Heartbeat):
            return msg  # type: ignore[no-any-return]


async def test_spawned_worker_serves_a_step_and_exits_cleanly(tiny_llama_dir: pathlib.Path) -> None:
    expected = hf_next_token(tiny_llama_dir)
    shm_before = set(our_shm_entries())
    process = None
    async with await open_engine_channels("shm", 1) as channels:
        config = worker_config(channels.address, str(tiny_llama_dir))
        process = multiprocessing.get_context("spawn").Process(target=run_worker, args=(config,))
        process.start()
        try:
            with anyio.fail_after(120):
                hello = await recv_skipping_heartbeats(channels)
                assert hello == Hello(rank=0, world_size=1, pid=process.pid)
                assert await recv_skipping_heartbeats(channels) == WorkerReady(
                    rank=0, num_kv_blocks=16
                )
                os.kill(process.pid, signal.SIGINT)  # Ctrl-C is the engine's business, not ours
                await channels.broadcast(STEP)
                result = await recv_skipping_heartbeats(channels)
                assert result == StepResult(0, ["r0"], [expected], None)
                while not isinstance((await channels.recv())[1], Heartbeat):
                    pass  # the heartbeat thread keeps beating while idle
                await channels.broadcast(Shutdown())
            await anyio.to_thread.run_sync(process.join, 60)
            assert process.exitcode == 0
        finally:
            if process.is_alive():
                process.kill()
                process.join()
    assert set(our_shm_entries()) - shm_before == set()


async def test_spawned_worker_exits_when_its_parent_dies(tiny_llama_dir: pathlib.Path) -> None:
    parent = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(300)"])
    process = None
    try:
        async with await open_engine_channels("shm", 1) as channels:
            config = worker_config(channels.address, str(tiny_llama_dir), parent_pid=parent.pid)
            process = multiprocessing.get_context("spawn").Process(
                target=run_worker, args=(config,)
            )
            process.start()
            with anyio.fail_after(120):
                assert isinstance(await recv_skipping_heartbeats(channels), Hello)
                assert isinstance(await recv_skipping_heartbeats(channels), WorkerReady)
            parent.kill()
            await parent.wait()
            # Generous bound: the worker checks its parent every RECV_POLL_SECONDS when idle.
            await anyio.to_thread.run_sync(process.join, 30)
            assert process.exitcode == 0
    finally:
        if parent.returncode is None:
            parent.kill()
        await parent.aclose()
        if process is not None and process.is_alive():
            process.kill()
            process.join()


def run_in_thread(config: dict[str, object]) -> tuple[threading.Thread, list[int]]:
    status: list[int] = []
    worker = Worker(config)
    thread = threading.Thread(target=lambda: status.append(worker.run()), daemon=True)
    thread.start()
    return thread, status


async def test_thread_worker_over_inproc_channels(tiny_llama_dir: pathlib.Path) -> None:
    expected = hf_next_token(tiny_llama_dir)
    async with await open_engine_channels("inproc", 1) as channels:
        thread, status = run_in_thread(worker_config(channels.address, str(tiny_llama_dir)))
        with anyio.fail_after(120):
            assert isinstance(await recv_skipping_heartbeats(channels), Hello)
            assert isinstance(await recv_skipping_heartbeats(channels), WorkerReady)
            await channels.broadcast(STEP)
            assert (await recv_skipping_heartbeats(channels)).sampled_token_ids == [expected]  # type: ignore[union-attr]
            await channels.broadcast(Shutdown())
        await anyio.to_thread.run_sync(thread.join, 30)
    assert status == [0]


async def test_load_failure_is_reported_not_hung(tmp_path: pathlib.Path) -> None:
    async with await open_engine_channels("inproc", 1) as channels:
        thread, status = run_in_thread(worker_config(channels.address, str(tmp_path / "missing")))
        with anyio.fail_after(60):
            assert isinstance(await recv_skipping_heartbeats(channels), Hello)
            error = await recv_skipping_heartbeats(channels)
        await anyio.to_thread.run_sync(thread.join, 30)
    assert isinstance(error, WorkerError) and error.rank == 0
    assert "missing" in error.message + error.traceback
    assert status == [1]


def test_bad_plugin_is_named() -> None:
    from shardline.worker.main import import_plugins

    with pytest.raises(ValueError, match="no callable 'nope'"):
        import_plugins(["json:nope"])
