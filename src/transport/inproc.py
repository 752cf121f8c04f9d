"""In-process transport: a pair of anyio memory object streams carrying encoded frames.

Used by tests and the single-process mode. Frames (not objects) travel, so an inproc link
checks exactly what a shm or tcp link checks. The async API runs in the event loop that created
the pair; the blocking API may be called from any *other* thread of the same process (a worker
thread): it hops into that loop with `anyio.from_thread` and the loop's token.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shardline.transport.base import DEFAULT_MAX_MESSAGE_SIZE, Frame, Listener, Transport
from shardline.transport.errors import TransportBroken, TransportClosed

_T = TypeVar("_T")


class InprocTransport(Transport):
    """One end of an in-process link; make pairs with :func:`pipe`."""

    def __init__(
        self,
        send_stream: MemoryObjectSendStream[bytes],
        recv_stream: MemoryObjectReceiveStream[bytes],
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._send_stream = send_stream
        self._recv_stream = recv_stream
        self.max_message_size = max_message_size
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._closed = False

    async def send_frame(self, frame: Frame) -> None:
        """Queue one frame for the peer (waits while the peer's buffer is full)."""
        self._check_size(frame)
        try:
            await self._send_stream.send(bytes(frame))
        except anyio.ClosedResourceError:
            raise TransportClosed("this end is closed") from None
        except anyio.BrokenResourceError:
            raise TransportClosed("the peer closed the link") from None

    async def recv_frame(self) -> Frame:
        """The next frame from the peer."""
        try:
            return await self._recv_stream.receive()
        except anyio.ClosedResourceError:
            raise TransportClosed("this end is closed") from None
        except anyio.EndOfStream:
            raise TransportClosed("the peer closed the link") from None

    def _in_loop(self, func: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("blocking inproc calls must come from another thread than the loop")
        try:
            return anyio.from_thread.run(func, token=self._token)
        except RuntimeError as exc:  # the owning event loop has stopped
            raise TransportBroken(f"the event loop of this link is gone: {exc}") from exc

    def send_frame_blocking(self, frame: Frame) -> None:
        """`send_frame` from a worker thread."""
        self._in_loop(lambda: self.send_frame(frame))

    def recv_frame_blocking(self, timeout: float | None = None) -> Frame:
        """`recv_frame` from a worker thread; `TimeoutError` after `timeout` seconds."""

        async def receive() -> Frame:
            with anyio.fail_after(math.inf if timeout is None else timeout):
                return await self.recv_frame()

        return self._in_loop(receive)

    def close(self) -> None:
        """Close both streams of this end; the peer sees `TransportClosed`."""
        if self._closed:
            return
        self._closed = True
        if threading.get_ident() == self._loop_thread:
            self._send_stream.close()
            self._recv_stream.close()
            return

        def close_in_loop() -> None:
            self._send_stream.close()
            self._recv_stream.close()

        try:
            anyio.from_thread.run_sync(close_in_loop, token=self._token)
        except RuntimeError:  # loop gone: nobody can be waiting on these streams any more
            pass


def pipe(
    max_buffer: int = 1024, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> tuple[InprocTransport, InprocTransport]:
    """Two connected ends, created in (and bound to) the running event loop."""
    a_send, b_recv = anyio.create_memory_object_stream[bytes](max_buffer)
    b_send, a_recv = anyio.create_memory_object_stream[bytes](max_buffer)
    return (
        InprocTransport(a_send, a_recv, max_message_size=max_message_size),
        InprocTransport(b_send, b_recv, max_message_size=max_message_size),
    )


_listeners: dict[str, InprocListener] = {}
_names = itertools.count()


class InprocListener(Listener):
    """Accepts in-process links by name (a key into a process-local registry)."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.name = f"inproc-{next(_names)}"
        self.max_message_size = max_message_size
        self.address: dict[str, Any] = {"kind": "inproc", "name": self.name}
        self._token = anyio.lowlevel.current_token()
        self._pending_send, self._pending_recv = anyio.create_memory_object_stream[InprocTransport](
            math.inf
        )
        _listeners[self.name] = self

    def _offer(self) -> InprocTransport:
        ours, theirs = pipe(max_message_size=self.max_message_size)
        try:
            self._pending_send.send_nowait(ours)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise TransportClosed(f"inproc listener {self.name} is closed") from None
        return theirs

    async def accept(self) -> Transport:
        """The next connected peer."""
        try:
            return await self._pending_recv.receive()
        except (anyio.ClosedResourceError, anyio.EndOfStream):
            raise TransportClosed(f"inproc listener {self.name} is closed") from None

    async def aclose(self) -> None:
        """Stop accepting; the name is freed."""
        _listeners.pop(self.name, None)
        self._pending_send.close()
        self._pending_recv.close()


def _lookup(address: dict[str, Any]) -> InprocListener:
    listener = _listeners.get(str(address.get("name")))
    if listener is None:
        raise TransportBroken(f"no inproc listener named {address.get('name')!r} in this process")
    return listener


async def connect(address: dict[str, Any]) -> InprocTransport:
    """Connect to an :class:`InprocListener` from its event loop."""
    return _lookup(address)._offer()


def connect_blocking(address: dict[str, Any]) -> InprocTransport:
    """Connect from another thread of the listener's process (for worker threads)."""
    listener = _lookup(address)

    async def offer() -> InprocTransport:
        return listener._offer()

    try:
        return anyio.from_thread.run(offer, token=listener._token)
    except RuntimeError as exc:
        raise TransportBroken(f"the event loop of {listener.name} is gone: {exc}") from exc
