"""Mixed channels: some ranks on the shm rings, the others over authenticated TCP, one facade."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from shardline.transport import WorkerChannels, connect_worker_channels, open_engine_channels
from shardline.transport.errors import TransportError
from shardline.transport.messages import Heartbeat, InitWorker, Shutdown


def _worker(address: dict[str, Any], rank: int, seen: dict[int, list[Any]]) -> None:
    """Echo every message's kind back as a Heartbeat until Shutdown."""
    channels: WorkerChannels = connect_worker_channels(address, rank, timeout=10)
    try:
        while True:
            msg = channels.recv(timeout=20)
            seen[rank].append(msg)
            if isinstance(msg, Shutdown):
                return
            channels.send(Heartbeat(rank=rank, seq=len(seen[rank])))
    except TransportError:  # the engine closed the channels first: nothing to answer
        return
    finally:
        channels.close()


async def test_mixed_broadcast_send_to_and_recv() -> None:
    """Ranks 0 and 2 on shm, 1 and 3 over TCP: broadcasts reach all, send_to only its target
    (in order with the broadcasts), and recv merges answers from both kinds."""
    seen: dict[int, list[Any]] = {rank: [] for rank in range(4)}
    channels = await open_engine_channels("shm", 4, token=b"secret", tcp_ranks=[1, 3])
    assert channels.address["kind"] == "mixed" and channels.address["shm_ranks"] == [0, 2]
    threads = [
        threading.Thread(target=_worker, args=(channels.address, rank, seen), daemon=True)
        for rank in range(4)
    ]
    try:
        for thread in threads:
            thread.start()
        await channels.wait_connected(20)
        await channels.broadcast(InitWorker(config={"step": 1}))
        await channels.send_to(1, InitWorker(config={"only": 1}))
        await channels.send_to(2, InitWorker(config={"only": 2}))
        await channels.broadcast(InitWorker(config={"step": 2}))
        answers: dict[int, list[int]] = {rank: [] for rank in range(4)}
        with anyio.fail_after(20):
            while sum(map(len, answers.values())) < 10:
                rank, msg = await channels.recv()
                assert isinstance(msg, Heartbeat) and msg.rank == rank
                answers[rank].append(msg.seq)
        assert answers == {0: [1, 2], 1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2]}
        await channels.broadcast(Shutdown())
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join, 10)
    finally:
        await channels.aclose()
    configs = {
        rank: [m.config for m in msgs if isinstance(m, InitWorker)] for rank, msgs in seen.items()
    }
    assert configs[0] == configs[3] == [{"step": 1}, {"step": 2}]
    assert configs[1] == [{"step": 1}, {"only": 1}, {"step": 2}]
    assert configs[2] == [{"step": 1}, {"only": 2}, {"step": 2}]


async def test_mixed_wait_connected_names_the_missing_tcp_rank() -> None:
    channels = await open_engine_channels("shm", 2, token=b"secret", tcp_ranks=[1])
    thread = threading.Thread(target=_worker, args=(channels.address, 0, {0: []}), daemon=True)
    try:
        thread.start()
        with pytest.raises(TimeoutError, match=r"workers \[1\]"):
            await channels.wait_connected(1.0)
    finally:
        await channels.aclose()  # wakes the shm worker: its recv raises TransportClosed
        await anyio.to_thread.run_sync(thread.join, 10)


async def test_tcp_ranks_need_kind_shm() -> None:
    with pytest.raises(ValueError, match="tcp_ranks"):
        await open_engine_channels("inproc", 2, tcp_ranks=[1])
    with pytest.raises(ValueError, match="out of range"):
        await open_engine_channels("shm", 2, tcp_ranks=[2])
