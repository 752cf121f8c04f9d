"""Watching the client while the engine works: disconnects abort, SSE responses clean up.

Two places wait on the engine for a client: a handler (the first output, or the whole answer
when not streaming) and an event stream. In both, the client hanging up must abort the
request, so its KV blocks are freed at once rather than when it would have finished.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work()` in this task; if the client hangs up first, cancel it and raise ClientGone.

    The work runs in the calling task (the task group's host), so an async generator it
    advances is advanced by the same task that later closes it.
    """
    outcome: list[T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await _wait_for_disconnect(request.receive)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as exc:
            # Re-raised below, outside the task group, so it is not wrapped in a group.
            failure.append(exc)
        tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    if not outcome:
        raise ClientGone()
    return outcome[0]


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop, and close their generator, when the client disconnects.

    Starlette only notices a disconnect on the next failed write for newer ASGI servers; this
    response listens for `http.disconnect` itself so an idle stream (waiting in the queue for
    its first token) is aborted too. Closing the generator runs its `finally`, which aborts the
    engine request.
    """

    def __init__(self, events: AsyncGenerator[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write; the finally below cleans up
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await _wait_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


# Line breaks to Unicode but not to JSON: a generated token can be one of these, and a client
# that splits the stream with str.splitlines() (httpx's aiter_lines does) would cut the event.
_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: str) -> str:
    """One server-sent event carrying `payload` (already JSON, or `[DONE]`).

    JSON escapes ASCII control characters itself; the three non-ASCII line breaks are escaped
    here (inside JSON strings, where alone they can occur, `\\u2028` means the same thing).
    """
    return f"data: {payload.translate(_UNICODE_LINE_BREAKS)}\n\n"
