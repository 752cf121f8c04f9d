"""The engine <-> worker facade for every kind: threads for inproc, spawned processes else."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import transport_peers

from conftest import KINDS
from shardline.transport import (
    EngineChannels,
    TransportBroken,
    TransportClosed,
    connect_worker_channels,
    open_engine_channels,
)
from shardline.transport.messages import Heartbeat, InitWorker, Shutdown, WorkerError

SPAWN = multiprocessing.get_context("spawn")


class Workers:
    """Starts channel workers as threads (inproc) or spawned processes (shm, tcp)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.threads: list[threading.Thread] = []
        self.processes: list[Any] = []

    def start(
        self, target: Callable[[dict[str, Any], int], None], address: dict[str, Any], rank: int
    ) -> None:
        if self.kind == "inproc":
            thread = threading.Thread(target=target, args=(address, rank), daemon=True)
            thread.start()
            self.threads.append(thread)
        else:
            process = SPAWN.Process(target=target, args=(address, rank), daemon=True)
            process.start()
            self.processes.append(process)

    async def join(self) -> None:
        for thread in self.threads:
            await anyio.to_thread.run_sync(thread.join, 10)
        for process in self.processes:
            await anyio.to_thread.run_sync(process.join, 10)
            if process.is_alive():
                process.kill()
                await anyio.to_thread.run_sync(process.join, 10)


@pytest.fixture(params=KINDS)
async def echo_group(request: pytest.FixtureRequest) -> AsyncIterator[EngineChannels]:
    """Engine channels with two echo workers attached."""
    workers = Workers(request.param)
    channels = await open_engine_channels(request.param, 2)
    try:
        for rank in range(2):
            workers.start(transport_peers.echo_worker, channels.address, rank)
        await channels.wait_connected(timeout=60)
        yield channels
    finally:
        await channels.aclose()
        await workers.join()


async def _collect(channels: EngineChannels, count: int) -> dict[int, list[Any]]:
    seen: dict[int, list[Any]] = {0: [], 1: []}
    with anyio.fail_after(30):
        for _ in range(count):
            rank, msg = await channels.recv()
            seen[rank].append(msg)
    return seen


async def test_broadcast_and_send_to_arrive_in_order_exactly_once(
    echo_group: EngineChannels,
) -> None:
    init = InitWorker({"model": "m", "sizes": [1, 2], "blob": b"\x00" * 300_000})
    await echo_group.send_to(1, init)
    for seq in range(20):
        await echo_group.broadcast(Heartbeat(rank=-1, seq=seq))
        if seq == 10:
            await echo_group.send_to(0, InitWorker({"only": 0}))
    seen = await _collect(echo_group, 20 + 20 + 2)
    beats = [Heartbeat(rank=-1, seq=seq) for seq in range(20)]
    assert seen[1] == [init, *beats]
    assert seen[0] == [*beats[:11], InitWorker({"only": 0}), *beats[11:]]


async def test_shutdown_then_workers_close(echo_group: EngineChannels) -> None:
    await echo_group.broadcast(Shutdown())
    with anyio.fail_after(10), pytest.raises(TransportBroken):
        await echo_group.recv()  # both workers close their channels without answering


async def test_wait_connected_names_the_missing_ranks() -> None:
    async with await open_engine_channels("inproc", 3) as channels:

        def attach() -> None:
            connect_worker_channels(channels.address, 1).close()

        await anyio.to_thread.run_sync(attach)
        with pytest.raises(TimeoutError, match=r"\[0, 2\]"):
            await channels.wait_connected(timeout=0.3)


@pytest.mark.parametrize("kind", ["shm", "tcp"])
async def test_killed_worker_is_reported_within_two_seconds(kind: str) -> None:
    workers = Workers(kind)
    async with await open_engine_channels(kind, 2) as channels:
        for rank in range(2):
            workers.start(transport_peers.heartbeat_then_sleep, channels.address, rank)
        await channels.wait_connected(timeout=60)
        got = {(await channels.recv())[0] for _ in range(2)}
        assert got == {0, 1}
        os.kill(workers.processes[1].pid, signal.SIGKILL)
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(TransportBroken, match="rank 1|died|ended"):
            await channels.recv()
        assert time.monotonic() - started < 3.0  # the target is 2 s; 1 s grace for busy CI
        for process in workers.processes:
            process.kill()
    await workers.join()


@pytest.mark.parametrize("kind", KINDS)
async def test_engine_close_wakes_a_blocked_worker(kind: str) -> None:
    channels = await open_engine_channels(kind, 1)
    outcome: list[BaseException] = []

    def worker() -> None:
        link = connect_worker_channels(channels.address, 0)
        try:
            link.recv(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)
        finally:
            link.close()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        await channels.wait_connected(timeout=30)
        await anyio.sleep(0.1)
    finally:
        await channels.aclose()
    await anyio.to_thread.run_sync(thread.join, 10)
    assert outcome and isinstance(outcome[0], TransportClosed | TransportBroken), outcome


@pytest.mark.parametrize("kind", KINDS)
async def test_worker_recv_times_out_and_stays_usable(kind: str) -> None:
    async with await open_engine_channels(kind, 1) as channels:
        results: list[Any] = []

        def worker() -> None:
            link = connect_worker_channels(channels.address, 0)
            try:
                with pytest.raises(TimeoutError):
                    link.recv(timeout=0.05)
                results.append(link.recv(timeout=30))
                link.send(WorkerError(0, "k", "m", "t"))
            finally:
                link.close()

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        await channels.wait_connected(timeout=30)
        await anyio.sleep(0.2)
        await channels.broadcast(Heartbeat(0, 7))
        with anyio.fail_after(30):
            assert await channels.recv() == (0, WorkerError(0, "k", "m", "t"))
        await anyio.to_thread.run_sync(thread.join, 10)
        assert results == [Heartbeat(0, 7)]


async def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown transport kind"):
        await open_engine_channels("udp", 1)  # type: ignore[arg-type]
