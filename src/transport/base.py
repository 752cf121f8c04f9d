"""The Transport interface every implementation (inproc, shm, tcp) answers, and the errors.

A transport moves whole messages, in order, reliably. Implementations move *frames* (one
encoded message each) and inherit typed `send`/`recv` from here, so the bytes on every
transport are exactly `messages.encode(msg)`.

Two ways to drive one: from an event loop (`await send/recv`, `async for`, `aclose`, `async
with`) or from a plain worker loop (`send_blocking`, `recv_blocking(timeout)`, `close`).
`recv_blocking` raises `TimeoutError` when `timeout` passes with nothing to read.

Errors: `TransportClosed` (this end was closed, or the peer closed in an orderly way),
`TransportBroken` (the peer died or sent bad bytes), `MessageTooLarge`, `AuthenticationError`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

from shardline.transport.errors import (
    AuthenticationError,
    MessageTooLarge,
    TransportBroken,
    TransportClosed,
    TransportError,
)
from shardline.transport.messages import Message, decode, encode

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "AuthenticationError",
    "Listener",
    "MessageTooLarge",
    "Transport",
    "TransportBroken",
    "TransportClosed",
    "TransportError",
    "map_os_errors",
]

DEFAULT_MAX_MESSAGE_SIZE = 256 << 20

Frame = bytes | bytearray | memoryview


@contextmanager
def map_os_errors(what: str) -> Iterator[None]:
    """Translate OS-level failures inside the block into `TransportBroken` (never leak them)."""
    try:
        yield
    except TransportError:
        raise
    except (OSError, EOFError) as exc:
        raise TransportBroken(f"{what}: {type(exc).__name__}: {exc}") from exc


class AsyncResource(abc.ABC):
    """Something with an idempotent `aclose()`, usable as `async with`."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the resource (idempotent)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Transport(AsyncResource):
    """One end of an ordered, reliable, message-oriented link (see the module docstring)."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE

    # -- frames: what implementations provide ---------------------------------------------

    @abc.abstractmethod
    async def send_frame(self, frame: Frame) -> None:
        """Send one encoded message."""

    @abc.abstractmethod
    async def recv_frame(self) -> Frame:
        """Receive one encoded message (cancel-safe: cancelling loses nothing)."""

    @abc.abstractmethod
    def send_frame_blocking(self, frame: Frame) -> None:
        """Blocking `send_frame`, for worker processes with a plain loop."""

    @abc.abstractmethod
    def recv_frame_blocking(self, timeout: float | None = None) -> Frame:
        """Blocking `recv_frame`; `TimeoutError` after `timeout` seconds with nothing to read."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close this end now (idempotent); a peer blocked on it is woken."""

    async def aclose(self) -> None:
        """Close this end (idempotent)."""
        self.close()

    # -- typed messages --------------------------------------------------------------------

    def _check_size(self, frame: Frame) -> Frame:
        if len(frame) > self.max_message_size:
            raise MessageTooLarge(
                f"message of {len(frame)} bytes exceeds the maximum of {self.max_message_size}"
            )
        return frame

    async def send(self, msg: Message) -> None:
        """Send one message."""
        await self.send_frame(self._check_size(encode(msg)))

    async def recv(self) -> Message:
        """Receive the next message; `TransportBroken` if its bytes are not a valid message."""
        return decode(await self.recv_frame())

    def send_blocking(self, msg: Message) -> None:
        """Send one message, blocking the calling thread."""
        self.send_frame_blocking(self._check_size(encode(msg)))

    def recv_blocking(self, timeout: float | None = None) -> Message:
        """Receive the next message, blocking the calling thread (`TimeoutError` on timeout)."""
        return decode(self.recv_frame_blocking(timeout))

    # -- iteration and context management ------------------------------------------------

    def __aiter__(self) -> Transport:
        return self

    async def __anext__(self) -> Message:
        """The next message; iteration ends when the link is closed in an orderly way."""
        try:
            return await self.recv()
        except TransportClosed:
            raise StopAsyncIteration from None



class Listener(AsyncResource):
    """Accepts incoming links; `address` is what a peer passes to the matching `connect`."""

    address: dict[str, Any]

    @abc.abstractmethod
    async def accept(self) -> Transport:
        """Wait for the next authenticated peer and return its transport."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop listening (idempotent); already accepted transports stay open."""

