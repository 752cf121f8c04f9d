"""One suite, every transport: order, sizes, closing, cancellation, peers in other processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import anyio
import anyio.lowlevel
import pytest
import transport_peers

from conftest import KINDS, SHM_SLOT_SIZE, TOKEN, make_pair
from shardline.transport import shm, tcp
from shardline.transport.base import Transport
from shardline.transport.errors import MessageTooLarge, TransportBroken, TransportClosed
from shardline.transport.messages import Heartbeat, Hello, Shutdown, WorkerError

SPAWN = multiprocessing.get_context("spawn")
SIZES = [0, 1, SHM_SLOT_SIZE, SHM_SLOT_SIZE + 1, 3 * SHM_SLOT_SIZE + 7, 64 << 20]


async def test_order_is_preserved(pair: tuple[Transport, Transport]) -> None:
    a, b = pair

    async def send_all() -> None:
        for seq in range(500):
            await a.send(Heartbeat(rank=0, seq=seq))

    async with anyio.create_task_group() as tg:
        tg.start_soon(send_all)
        received = [await b.recv() for _ in range(500)]
    assert received == [Heartbeat(rank=0, seq=seq) for seq in range(500)]


async def test_both_directions(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    await a.send(Hello(rank=1, world_size=2, pid=3))
    assert await b.recv() == Hello(rank=1, world_size=2, pid=3)
    await b.send(Shutdown())
    assert await a.recv() == Shutdown()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
async def test_sizes_arrive_intact(pair: tuple[Transport, Transport], size: int) -> None:
    a, b = pair
    payload = os.urandom(size)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.send_frame, payload)
        received = await b.recv_frame()
    assert bytes(received) == payload


async def test_too_large_is_refused_and_link_survives(
    kind_pair_small: tuple[Transport, Transport],
) -> None:
    a, b = kind_pair_small
    with pytest.raises(MessageTooLarge):
        await a.send_frame(b"x" * 1025)
    with pytest.raises(MessageTooLarge):
        a.send_blocking(WorkerError(rank=0, kind="x", message="m" * 2000, traceback=""))
    await a.send_frame(b"y" * 1024)
    assert bytes(await b.recv_frame()) == b"y" * 1024


@pytest.fixture(params=KINDS)
async def kind_pair_small(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    a, b = await make_pair(request.param, max_message_size=1024)
    yield a, b
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("closer", ["sender", "receiver"])
async def test_close_wakes_the_pending_reader(
    pair: tuple[Transport, Transport], closer: str
) -> None:
    a, b = pair
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def close_soon() -> None:
                await anyio.sleep(0.05)
                await (a if closer == "sender" else b).aclose()

            tg.start_soon(close_soon)
            with pytest.raises((TransportClosed, TransportBroken)):
                await b.recv()


async def test_closing_one_end_fails_the_other_ends_send(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    await b.aclose()
    with anyio.fail_after(5), pytest.raises((TransportClosed, TransportBroken)):
        for _ in range(10_000):  # tcp may accept a few frames into kernel buffers first
            await a.send_frame(b"z" * 4096)
            await anyio.lowlevel.checkpoint()


async def test_async_iteration_ends_on_close(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    for seq in range(3):
        await a.send(Heartbeat(rank=0, seq=seq))
    await a.aclose()
    with anyio.fail_after(5):
        seen = [msg async for msg in b]
    assert seen == [Heartbeat(rank=0, seq=seq) for seq in range(3)]


async def test_cancelled_recv_leaves_transport_usable(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    for seq in range(20):
        with anyio.move_on_after(0.01):
            await b.recv()
            pytest.fail("nothing was sent, recv must not return")
        await a.send(Heartbeat(rank=0, seq=seq))
        with anyio.fail_after(5):
            assert await b.recv() == Heartbeat(rank=0, seq=seq)
    # Nothing phantom queued up by the cancelled waits:
    with anyio.move_on_after(0.2):
        await b.recv()
        pytest.fail("a cancelled recv left a phantom message behind")


async def test_blocking_api_from_a_worker_thread(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                b.send_blocking(b.recv_blocking(timeout=10))
            with pytest.raises(TimeoutError):
                b.recv_blocking(timeout=0.05)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        with anyio.fail_after(20):
            for seq in range(50):
                await a.send(Heartbeat(rank=0, seq=seq))
                assert await a.recv() == Heartbeat(rank=0, seq=seq)
    finally:
        await anyio.to_thread.run_sync(thread.join)
    assert not errors, errors


# -- peers in other processes (spawned, not forked) -------------------------------------------

CROSS = ["shm", "tcp"]


async def _remote_link(kind: str, target, max_message_size: int = 256 << 20):  # type: ignore[no-untyped-def]
    if kind == "shm":
        ours, address = shm.create_link(nslots=8, slot_size=SHM_SLOT_SIZE)
        process = SPAWN.Process(target=target, args=(kind, address), daemon=True)
        process.start()
        return ours, process
    listener = tcp.TcpListener(TOKEN)
    process = SPAWN.Process(target=target, args=(kind, listener.address, TOKEN), daemon=True)
    process.start()
    try:
        with anyio.fail_after(60):
            ours = await listener.accept()
    finally:
        await listener.aclose()
    return ours, process


@pytest.mark.parametrize("kind", CROSS)
async def test_reader_in_spawned_process(kind: str) -> None:
    ours, process = await _remote_link(kind, transport_peers.echo_link)
    try:
        with anyio.fail_after(60):
            for size in [0, 1, SHM_SLOT_SIZE, SHM_SLOT_SIZE + 1, 5 << 20]:
                payload = os.urandom(size)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ours.send_frame, payload)
                    echoed = await ours.recv_frame()
                assert bytes(echoed) == payload
            await ours.send(Hello(rank=3, world_size=4, pid=5))
            assert await ours.recv() == Hello(rank=3, world_size=4, pid=5)
    finally:
        await ours.aclose()
        await anyio.to_thread.run_sync(process.join, 10)
    assert process.exitcode == 0


@pytest.mark.parametrize("kind", CROSS)
async def test_killed_peer_is_broken_within_two_seconds(kind: str) -> None:
    ours, process = await _remote_link(kind, transport_peers.connect_and_sleep)
    try:
        with anyio.fail_after(60):
            assert bytes(await ours.recv_frame()) == b"ready"
        os.kill(process.pid, signal.SIGKILL)
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(TransportBroken):
            await ours.recv_frame()
        assert time.monotonic() - started < 2.0 + 1.0  # 2 s target, 1 s grace for a busy CI box
    finally:
        await ours.aclose()
        await anyio.to_thread.run_sync(process.join, 10)


@pytest.mark.parametrize("kind", CROSS)
async def test_killed_peer_fails_a_blocked_sender(kind: str) -> None:
    ours, process = await _remote_link(kind, transport_peers.connect_and_sleep)
    try:
        with anyio.fail_after(60):
            assert bytes(await ours.recv_frame()) == b"ready"
        os.kill(process.pid, signal.SIGKILL)
        with anyio.fail_after(10), pytest.raises((TransportBroken, TransportClosed)):
            while True:  # fills the ring / socket buffers, then must fail, never hang
                await ours.send_frame(b"q" * SHM_SLOT_SIZE)
    finally:
        await ours.aclose()
        await anyio.to_thread.run_sync(process.join, 10)
