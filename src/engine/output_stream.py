"""The stream one request's outputs travel on, from the EngineCore loop to its caller."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

import anyio

from shardline.engine.request import RequestOutput

StreamItem = RequestOutput | BaseException


class _EndOfStream:
    """The value a `next_future` resolves to once the stream is closed and drained."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM: Final = _EndOfStream()


class OutputStream:
    """One request's outputs, loop -> caller: an unbounded queue with at most one waiter.

    It replaces an anyio memory stream pair on the hot path: with hundreds of streaming
    requests, every step publishes one item to each, and anyio's stream costs a checkpoint
    (an extra event-loop pass) per receive plus backend look-ups per call. Here a send to a
    waiting caller hands the item straight to its future (one wake-up, no queue), a send to a
    busy caller is a deque append, and a caller that fell behind drains everything queued
    without yielding. Same contract as the anyio pair it replaces: `send_nowait` raises
    BrokenResourceError once the caller closed its end and ClosedResourceError after `close`;
    iteration ends after `close` once the queue is drained. Single event loop only (the
    EngineCore and its callers share one).
    """

    __slots__ = ("_items", "_waiter", "_closed", "_receiver_closed")

    def __init__(self) -> None:
        self._items: deque[StreamItem] = deque()
        # Only set while the queue is empty: the caller awaits it for the next item.
        self._waiter: asyncio.Future[Any] | None = None
        self._closed = False
        self._receiver_closed = False

    # -- the loop's end
    def send_nowait(self, item: StreamItem) -> None:
        """Hand `item` to the waiting caller, or queue it."""
        if self._receiver_closed:
            raise anyio.BrokenResourceError
        if self._closed:
            raise anyio.ClosedResourceError
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a cancelled wait leaves its (done) future behind
                waiter.set_result(item)
                return
        self._items.append(item)

    def close(self) -> None:
        """No more items: the caller's iteration ends once it drained the queue."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(END_OF_STREAM)

    @property
    def receiver_closed(self) -> bool:
        """True once the caller closed its end (a send would raise BrokenResourceError)."""
        return self._receiver_closed

    # -- the caller's end
    def next_future(self) -> asyncio.Future[Any]:
        """A future for the next item, or END_OF_STREAM once closed and drained.

        It is already done when an item is queued (awaiting it does not yield). Awaited
        directly by the caller's iterator, without a coroutine of its own: this runs once per
        step for every streaming request. ClosedResourceError after `close_receiver`.
        """
        if self._receiver_closed:
            raise anyio.ClosedResourceError
        future = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.popleft())
        elif self._closed:
            future.set_result(END_OF_STREAM)
        else:
            self._waiter = future
        return future

    async def receive(self) -> StreamItem:
        """The next item; EndOfStream after `close` and an empty queue."""
        future = self.next_future()
        try:
            item = await future
        finally:
            if self._waiter is future:
                self._waiter = None
        if item is END_OF_STREAM:
            raise anyio.EndOfStream
        return item  # type: ignore[no-any-return]

    def close_receiver(self) -> None:
        """The caller is gone: later sends raise BrokenResourceError."""
        self._receiver_closed = True
        self._items.clear()
        waiter = self._waiter
        if waiter is not None:  # another task waiting on this end (not the usual caller)
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(anyio.ClosedResourceError())

    async def aclose(self) -> None:
        self.close_receiver()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> StreamItem:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close_receiver()
