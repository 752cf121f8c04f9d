"""Shared-memory transport: ring endpoints (see `transport.shm_ring` for the layout) and links.

* :class:`RingWriter` / :class:`RingReader`: the two ends of one ring (blocking API).
* :class:`ShmTransport`: a `Transport` made of an outgoing and/or an incoming ring end, with
  the async API layered on the blocking one without blocking the event loop. Its async
  receiving end is a :class:`_Receiver`: one thread of its own that reads each frame as it is
  published (the blocking `read`) and hands it to the event loop, waking the loop only when a
  task is waiting; cancelling a pending `recv` loses nothing (the frame waits in the queue).
  One thread wake and one loop wake a frame: a helper thread per wait (anyio's `to_thread`,
  as this module did before) cost a queue hand-off, a second thread wake-up and ~40% of the
  engine process's interpreter time a decode step (py-spy, one stream).
* :func:`write_async`: one frame out without blocking the loop: inline when it fits the ring's
  free room, else in a shielded thread so a half-written message can never be abandoned.
* :func:`create_link` / :func:`connect`: a point-to-point duplex link (two rings, 1 reader each).
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import posix_ipc

from shardline.transport.base import DEFAULT_MAX_MESSAGE_SIZE, Frame, Transport
from shardline.transport.errors import TransportBroken, TransportClosed
from shardline.transport.shm_ring import (
    ATTACHED,
    CLOSED,
    SLOT_HEADER,
    WRITE_SEQ,
    WRITER_PID,
    WRITER_STATE,
    Ring,
    peer_check,
    reader_words,
)

INLINE_LIMIT = 1 << 20
DEFAULT_SLOT_SIZE = 256 << 10
DEFAULT_NSLOTS = 32


def _try_acquire(sem: posix_ipc.Semaphore) -> bool:
    """Take a unit of `sem` if one is there (sem_trywait: no syscall, never blocks)."""
    try:
        sem.acquire(0)
    except posix_ipc.BusyError:
        return False
    return True


class RingWriter:
    """The single writer of a ring; frames of any size (split across slots)."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        header = ring.header
        header[WRITER_PID] = os.getpid()
        header[WRITER_STATE] = ATTACHED
        self._seq = header[WRITE_SEQ]
        self._words = [reader_words(i) for i in range(ring.nreaders)]
        self._has_space = [self._space_probe(seq) for seq, _, _ in self._words]
        self._checks = [
            peer_check(ring, pid, state, f"reader {i}")
            for i, (_, pid, state) in enumerate(self._words)
        ]
        self._closed = False

    def _space_probe(self, seq_word: int) -> Callable[[], bool]:
        return lambda: self._seq - self.ring.header[seq_word] < self.ring.nslots

    def _chunks(self, size: int) -> int:
        return max(1, -(-size // self.ring.slot_size))

    def has_room(self, size: int) -> bool:
        """Whether a frame of `size` bytes fits now without waiting for any reader."""
        header, nslots, need = self.ring.header, self.ring.nslots, self._chunks(size)
        return all(self._seq - header[seq] + need <= nslots for seq, _, _ in self._words)

    def _check_readers_open(self, header: memoryview) -> None:
        for i, (_, pid, state) in enumerate(self._words):
            if header[state] == CLOSED:
                raise TransportClosed(f"reader {i} (pid {header[pid]}) closed its end")

    def write(self, frame: Frame) -> None:
        """Publish one frame to every reader, waiting for free slots as needed."""
        ring = self.ring
        if type(frame) is bytes and len(frame) <= ring.slot_size:
            self._write_one(frame)
            return
        with ring.using() as handles:
            header, view = handles.header, handles.view
            data = memoryview(frame).cast("B")
            total, slot_size, pos = len(data), ring.slot_size, 0
            for chunk in range(self._chunks(total)):
                for i in range(ring.nreaders):
                    ring.wait(handles.space_sems[i], self._has_space[i], self._checks[i])
                if chunk == 0:
                    self._check_readers_open(header)
                offset = ring.header_size + (self._seq % ring.nslots) * ring.stride
                if chunk == 0:
                    view[offset : offset + SLOT_HEADER] = total.to_bytes(SLOT_HEADER, "little")
                size = min(slot_size, total - pos)
                start = offset + SLOT_HEADER
                view[start : start + size] = data[pos : pos + size]
                pos += size
                self._seq += 1
                header[WRITE_SEQ] = self._seq
                for sem in handles.data_sems:
                    sem.release()

    def _write_one(self, frame: bytes) -> None:
        """`write` for a frame that fits one slot (every small message): the same steps, inline."""
        ring = self.ring
        with ring.using() as handles:
            header, view = handles.header, handles.view
            for i, (seq_word, _, _) in enumerate(self._words):
                sem = handles.space_sems[i]
                # The common case, as in `wait_semaphore`: room, and its unit taken without a syscall.
                if not (self._seq - header[seq_word] < ring.nslots and _try_acquire(sem)):
                    ring.wait(sem, self._has_space[i], self._checks[i])
            self._check_readers_open(header)
            offset = ring.header_size + (self._seq % ring.nslots) * ring.stride
            total = len(frame)
            view[offset : offset + SLOT_HEADER] = total.to_bytes(SLOT_HEADER, "little")
            view[offset + SLOT_HEADER : offset + SLOT_HEADER + total] = frame
            self._seq += 1
            header[WRITE_SEQ] = self._seq
            for data_sem in handles.data_sems:
                data_sem.release()

    def close(self) -> None:
        """Mark the writer closed, wake every reader, release (and, as creator, unlink)."""
        if self._closed:
            return
        self._closed = True
        try:
            with self.ring.using() as handles:
                handles.header[WRITER_STATE] = CLOSED
                for sem in handles.data_sems:
                    sem.release()
        except (TransportClosed, posix_ipc.Error):
            pass
        self.ring.close()


class RingReader:
    """Reader `index` of a ring; every frame the writer publishes, in order, exactly once."""

    def __init__(
        self, ring: Ring, index: int, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        if not 0 <= index < ring.nreaders:
            raise ValueError(f"reader index {index} out of range for {ring.nreaders} readers")
        self.ring, self.index, self.max_message_size = ring, index, max_message_size
        self._seq_word, pid_word, state_word = reader_words(index)
        header = ring.header
        header[pid_word] = os.getpid()
        header[state_word] = ATTACHED
        self._state_word = state_word
        self._seq = header[self._seq_word]
        self._check_writer = peer_check(ring, WRITER_PID, WRITER_STATE, "writer")
        self._closed = False

    def available(self) -> int:
        """Slots published but not read yet."""
        return int(self.ring.header[WRITE_SEQ] - self._seq)

    def _take(self, handles: Any, deadline: float | None) -> None:
        """Take the unit of the next unread slot."""
        sem = handles.data_sems[self.index]
        while True:
            self.ring.wait(sem, lambda: self.available() > 0, self._check_writer, deadline)
            if self.available() > 0:
                return
            if handles.header[WRITER_STATE] == CLOSED or self._closed:
                sem.release()  # a close wake-up: keep it for whoever asks next
                if self._closed:
                    raise TransportClosed(f"this end of shm ring {self.ring.base} is closed")
                raise TransportClosed(f"the writer closed shm ring {self.ring.base}")

    def _slot(self) -> int:
        return self.ring.header_size + (self._seq % self.ring.nslots) * self.ring.stride

    def _free(self, handles: Any) -> None:
        self._seq += 1
        handles.header[self._seq_word] = self._seq
        handles.space_sems[self.index].release()

    def _begin(self, handles: Any, deadline: float | None) -> int:
        self._take(handles, deadline)
        return self._check_total(handles)

    def _check_total(self, handles: Any) -> int:
        """The size of the frame whose first slot was just taken (refused if too large)."""
        offset = self._slot()
        total = int.from_bytes(handles.view[offset : offset + SLOT_HEADER], "little")
        if total > self.max_message_size:
            raise TransportBroken(
                f"shm frame of {total} bytes exceeds the maximum of {self.max_message_size}"
            )
        return total

    def _finish(self, handles: Any, total: int) -> Frame:
        view, slot_size = handles.view, self.ring.slot_size
        start = self._slot() + SLOT_HEADER
        if total <= slot_size:
            out: Frame = bytes(view[start : start + total])
            self._free(handles)
            return out
        buffer = bytearray(total)
        buffer[:slot_size] = view[start : start + slot_size]
        self._free(handles)
        pos = slot_size
        while pos < total:
            self._take(handles, None)
            start, size = self._slot() + SLOT_HEADER, min(slot_size, total - pos)
            buffer[pos : pos + size] = view[start : start + size]
            self._free(handles)
            pos += size
        return buffer

    def read(self, timeout: float | None = None) -> Frame:
        """The next frame, blocking; TimeoutError if none starts within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.ring.using() as handles:
            # The common case, as in `_take`: a slot is published and its unit is there.
            if handles.header[WRITE_SEQ] - self._seq > 0 and _try_acquire(handles.data_sems[self.index]):
                total = self._check_total(handles)
            else:
                total = self._begin(handles, deadline)
            return self._finish(handles, total)

    def close(self) -> None:
        """Mark this reader closed, wake the writer, release (and, as creator, unlink)."""
        if self._closed:
            return
        self._closed = True
        try:
            with self.ring.using() as handles:
                handles.header[self._state_word] = CLOSED
                handles.space_sems[self.index].release()
                handles.data_sems[self.index].release()  # wakes a thread of ours blocked in read
        except (TransportClosed, posix_ipc.Error):
            pass
        self.ring.close()


async def _in_thread(func: Callable[[], Any]) -> Any:
    """Run a blocking ring operation that must not be abandoned half-way."""
    with anyio.CancelScope(shield=True):
        return await anyio.to_thread.run_sync(func)


async def write_async(writer: RingWriter, frame: Frame) -> None:
    """`writer.write()` without blocking the event loop (never abandoned half-way)."""
    if len(frame) <= INLINE_LIMIT and writer.has_room(len(frame)):
        writer.write(frame)
    else:
        await _in_thread(lambda: writer.write(frame))


class _Receiver:
    """The async receiving end of a ring reader: a thread that reads frames as they arrive.

    The thread blocks in `RingReader.read` and appends each frame to a queue (at most
    `MAX_QUEUED`; then it waits, and the ring's own flow control holds the writer back). A task
    awaiting `recv` is woken with one `call_soon_threadsafe`; when the loop is busy elsewhere no
    wake-up is sent at all. An error of the ring (the peer closed or died, this end closed) is
    kept and raised to every later `recv`; the thread then ends.
    """

    MAX_QUEUED = 256

    def __init__(self, reader: RingReader, loop: asyncio.AbstractEventLoop) -> None:
        self._reader, self._loop = reader, loop
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._arrived = threading.Condition(self._lock)
        self._frames: collections.deque[Frame] = collections.deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"shm-recv-{reader.ring.base}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            error: BaseException | None = None
            try:
                frame = self._reader.read()
            except BaseException as exc:  # delivered to the reader's tasks, then this thread ends
                error = exc
            with self._lock:
                if error is None:
                    while len(self._frames) >= self.MAX_QUEUED and not self._stopping:
                        self._room.wait()
                    if self._stopping:
                        return
                    self._frames.append(frame)
                else:
                    self._error = error
                self._arrived.notify_all()
                waiter, self._waiter = self._waiter, None
            if waiter is not None:
                try:
                    self._loop.call_soon_threadsafe(_wake, waiter)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass
            if error is not None:
                return

    def _take(self) -> Frame | None:
        """The next frame, or None (the caller waits); raises the ring's error. Lock held."""
        if self._frames:
            frame = self._frames.popleft()
            self._room.notify()
            return frame
        if self._error is not None:
            raise self._error
        return None

    async def recv(self) -> Frame:
        while True:
            with self._lock:
                frame = self._take()
                if frame is not None:
                    return frame
                waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None

    def recv_blocking(self, timeout: float | None) -> Frame:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                frame = self._take()
                if frame is not None:
                    return frame
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("nothing arrived before the timeout")
                self._arrived.wait(left)

    def stop(self) -> None:
        """Let the thread end (the reader's close wakes it from `read`)."""
        with self._lock:
            self._stopping = True
            self._room.notify_all()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ShmTransport(Transport):
    """A link over shm rings: frames go out through `writer` and come in through `reader`."""

    def __init__(
        self,
        writer: RingWriter | None,
        reader: RingReader | None,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.writer, self.reader = writer, reader
        self.max_message_size = max_message_size
        if reader is not None:
            reader.max_message_size = max_message_size
        self._closed = False
        self._receiver: _Receiver | None = None

    def _out(self) -> RingWriter:
        if self._closed:
            raise TransportClosed("this end is closed")
        if self.writer is None:
            raise TransportClosed("this end of the shm link is receive-only")
        return self.writer

    def _in(self) -> RingReader:
        if self._closed:
            raise TransportClosed("this end is closed")
        if self.reader is None:
            raise TransportClosed("this end of the shm link is send-only")
        return self.reader

    async def send_frame(self, frame: Frame) -> None:
        """Send one frame (see the module docstring for when a thread is used)."""
        await write_async(self._out(), self._check_size(frame))

    async def recv_frame(self) -> Frame:
        """Receive one frame without blocking the loop; cancel-safe (see `_Receiver`)."""
        reader = self._in()
        if self._receiver is None:
            self._receiver = _Receiver(reader, asyncio.get_running_loop())
        return await self._receiver.recv()

    def send_frame_blocking(self, frame: Frame) -> None:
        """Send one frame, blocking this thread."""
        self._out().write(self._check_size(frame))

    def recv_frame_blocking(self, timeout: float | None = None) -> Frame:
        """Receive one frame, blocking this thread; TimeoutError after `timeout` seconds."""
        reader = self._in()
        if self._receiver is not None:  # the receiving thread reads the ring: ask it
            return self._receiver.recv_blocking(timeout)
        return reader.read(timeout)

    def close(self) -> None:
        """Close both ring ends (the peer is woken; names are unlinked by their creator)."""
        if self._closed:
            return
        self._closed = True
        if self._receiver is not None:
            self._receiver.stop()
        for end in (self.writer, self.reader):
            if end is not None:
                end.close()


def create_link(
    *,
    nslots: int = DEFAULT_NSLOTS,
    slot_size: int = DEFAULT_SLOT_SIZE,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> tuple[ShmTransport, dict[str, Any]]:
    """Create a duplex link; returns this end and the address the peer passes to `connect`."""
    outgoing = Ring.create(nslots, slot_size, 1)
    try:
        incoming = Ring.create(nslots, slot_size, 1)
    except BaseException:
        outgoing.close()
        raise
    ours = ShmTransport(
        RingWriter(outgoing), RingReader(incoming, 0), max_message_size=max_message_size
    )
    address = {
        "kind": "shm",
        "recv": outgoing.address,
        "send": incoming.address,
        "max_message_size": max_message_size,
    }
    return ours, address


def connect(address: dict[str, Any]) -> ShmTransport:
    """Attach to the link `create_link` made (from any process)."""
    recv_ring = Ring.attach(address["recv"])
    try:
        send_ring = Ring.attach(address["send"])
    except BaseException:
        recv_ring.close()
        raise
    max_size = int(address.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE))
    return ShmTransport(
        RingWriter(send_ring),
        RingReader(recv_ring, 0, max_message_size=max_size),
        max_message_size=max_size,
    )
