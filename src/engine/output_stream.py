"""The stream one request's outputs travel on, from the EngineCore loop to its caller."""

from __future__ import annotations

import asyncio
from collections import deque

import anyio

from engine.request import RequestOutput

StreamItem = RequestOutput | BaseException


class OutputStream:
    """One request's outputs, loop -> caller: an unbounded queue with at most one waiter.

    It replaces an anyio memory stream pair on the hot path: with hundreds of streaming
    requests, every step publishes one item to each, and anyio's stream costs a checkpoint
    (an extra event-loop pass) per receive plus backend look-ups per call. Here a send is a
    deque append and at most one future wake-up; a caller that fell behind drains everything
    queued without yielding. Same contract as the anyio pair it replaces: `send_nowait`
    raises BrokenResourceError once the caller closed its end and ClosedResourceError after
    `close`; iteration ends after `close` once the queue is drained. Single event loop only
    (the EngineCore and its callers share one).
    """

    __slots__ = ("_items", "_waiter", "_closed", "_receiver_closed")

    def __init__(self) -> None:
        self._items: deque[StreamItem] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._receiver_closed = False

    # -- the loop's end
    def send_nowait(self, item: StreamItem) -> None:
        """Queue `item` and wake the caller if it waits."""
        if self._receiver_closed:
            raise anyio.BrokenResourceError
        if self._closed:
            raise anyio.ClosedResourceError
        self._items.append(item)
        self._wake()

    def close(self) -> None:
        """No more items: the caller's iteration ends once it drained the queue."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    @property
    def receiver_closed(self) -> bool:
        """True once the caller closed its end (a send would raise BrokenResourceError)."""
        return self._receiver_closed

    # -- the caller's end
    async def receive(self) -> StreamItem:
        """The next item; EndOfStream after `close` and an empty queue."""
        while not self._items:
            if self._receiver_closed:
                raise anyio.ClosedResourceError
            if self._closed:
                raise anyio.EndOfStream
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()

    def close_receiver(self) -> None:
        """The caller is gone: later sends raise BrokenResourceError."""
        self._receiver_closed = True
        self._items.clear()

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
