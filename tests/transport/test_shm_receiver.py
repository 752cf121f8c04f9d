"""The shm transport's async receiving thread (`shm._Receiver`): what it keeps of the blocking
ring's contract when it reads ahead of the tasks that ask."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from shardline.transport import shm
from shardline.transport.errors import TransportBroken, TransportClosed


def _receiver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shm-recv-")]


@contextlib.asynccontextmanager
async def _link(nslots: int = 8, slot_size: int = 4096) -> AsyncIterator[tuple[shm.ShmTransport, shm.ShmTransport]]:
    ours, address = shm.create_link(nslots=nslots, slot_size=slot_size)
    theirs = shm.connect(address)
    try:
        yield ours, theirs
    finally:
        await ours.aclose()
        await theirs.aclose()


async def test_frames_read_ahead_reach_a_blocking_reader_in_order() -> None:
    async with _link() as (ours, theirs):
        await theirs.send_frame(b"first")
        assert await ours.recv_frame() == b"first"  # the receiving thread now reads the ring
        for i in range(5):
            await theirs.send_frame(b"frame %d" % i)
        got = await anyio.to_thread.run_sync(lambda: [ours.recv_frame_blocking(5) for _ in range(5)])
        assert got == [b"frame %d" % i for i in range(5)]
        with pytest.raises(TimeoutError):
            await anyio.to_thread.run_sync(lambda: ours.recv_frame_blocking(0.05))


async def test_a_full_queue_holds_the_writer_back_and_drains_in_order() -> None:
    nslots = 4
    total = shm._Receiver.MAX_QUEUED + 40
    sent = 0
    async with _link(nslots, 1024) as (ours, theirs):

        def send_all() -> None:
            nonlocal sent
            for i in range(total):
                theirs.send_frame_blocking(b"%08d" % i)
                sent += 1

        await theirs.send_frame(b"start")
        assert await ours.recv_frame() == b"start"  # the receiving thread is running
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        last = -1
        with anyio.fail_after(20):
            while sent != last:  # until the sender stops getting anywhere
                last = sent
                await anyio.sleep(0.2)
        # Held back: the thread's queue and the ring's slots are full (one frame in the
        # thread's hands, waiting for room in the queue).
        assert sent < total
        assert sent <= shm._Receiver.MAX_QUEUED + nslots + 1
        received = [await ours.recv_frame() for _ in range(total)]
        assert received == [b"%08d" % i for i in range(total)]
        await anyio.to_thread.run_sync(lambda: sender.join(5))
        assert sent == total


async def test_closing_ends_the_thread_and_fails_a_waiting_recv() -> None:
    before = set(_receiver_threads())
    failure: list[BaseException] = []
    async with _link() as (ours, _theirs):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                try:
                    await ours.recv_frame()
                except TransportClosed as exc:
                    failure.append(exc)

            tg.start_soon(wait)
            await anyio.sleep(0.05)
            started = set(_receiver_threads()) - before
            assert len(started) == 1
            await ours.aclose()
        assert failure, "the pending recv was not failed by the close"
        (thread,) = started
        await anyio.to_thread.run_sync(lambda: thread.join(5))
        assert not thread.is_alive()
        with pytest.raises(TransportClosed):
            await ours.recv_frame()


async def test_the_peers_close_is_kept_for_every_later_recv() -> None:
    async with _link() as (ours, theirs):
        await theirs.send_frame(b"last")
        await theirs.aclose()
        assert await ours.recv_frame() == b"last"  # what was sent before the close still arrives
        for _ in range(2):
            with pytest.raises((TransportClosed, TransportBroken)):
                await ours.recv_frame()
