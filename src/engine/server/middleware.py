"""Gatekeeping before any handler runs: the API key, then the body's size and deadline.

A pure ASGI middleware (not `BaseHTTPMiddleware`) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shardline.engine.server.errors import APIError
from shardline.engine.server.http_limits import DEFAULT_BODY_TIMEOUT_S

DEFAULT_MAX_BODY_BYTES = 4 << 20
"""4 MiB: far more than any prompt the context length admits, far less than memory."""
DRAIN_LIMIT_BYTES = 64 << 20
"""A refused body up to this size is read (and dropped) so the client gets its 413; a larger
one is answered at once and the connection closed."""


def api_key_bytes(api_key: str | None) -> bytes | None:
    """The key as clients must send it: its UTF-8 encoding (ValueError if it has none, e.g. a
    lone surrogate from an environment variable that was not UTF-8)."""
    if api_key is None:
        return None
    try:
        return api_key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the API key is not valid text (it must be UTF-8): {exc}") from None


class GatekeeperMiddleware:
    """Refuse requests without the API key (401), with a body over `max_body_bytes` (413), or
    whose body does not arrive within `body_timeout_s` of its headers (408; None: no limit).

    Paths in `public_paths` (health checks, metrics scrapes) need no key. The body is read
    here, up to the limit, and replayed to the app; after it, `receive` is the server's own,
    so the app still sees `http.disconnect` when the client goes away (the deadline covers
    the body only, never a response's time).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        public_paths: Iterable[str] = (),
        body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        if body_timeout_s is not None and not body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be > 0, got {body_timeout_s}")
        self.body_timeout_s = body_timeout_s
        self.app = app
        self.api_key = api_key
        self._api_key_bytes = api_key_bytes(api_key)
        self.max_body_bytes = max_body_bytes
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] not in self.public_paths:
            if not self._authorized(scope):
                error = APIError(
                    401,
                    "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await error.response(headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        declared = _content_length(scope)
        too_large = declared is not None and declared > self.max_body_bytes
        body: bytes | None = None
        more_messages: list[Message] = []
        with anyio.move_on_after(self.body_timeout_s) as deadline:
            if too_large:
                if declared is not None and declared <= DRAIN_LIMIT_BYTES:
                    await _drain(receive)
            else:
                body, more_messages = await self._read_body(receive)
        if deadline.cancelled_caught:
            await self._too_slow(scope, receive, send)
            return
        if body is None:
            await self._too_large(scope, receive, send)
            return
        await self.app(scope, _replay(body, more_messages, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        """The first Authorization header is `Bearer <key>`, the key as UTF-8 bytes.

        Header values are bytes on the wire; they are compared as bytes, never decoded, so a
        key is accepted in exactly one encoding: a non-ASCII key sent as latin-1 (or any other
        encoding than UTF-8), or a value that is not UTF-8 at all, is refused.
        """
        assert self._api_key_bytes is not None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = bytes(value).partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                return hmac.compare_digest(token.strip(b" \t"), self._api_key_bytes)
        return False

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, list[Message]]:
        """The whole body, or None once it passes the limit; plus any non-body message seen."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # A disconnect before the body ended: let the app see it.
                return b"".join(chunks), [message]
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                if message.get("more_body", False):
                    await _drain(receive, already=size)
                return None, []
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), []

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            413,
            f"request body is larger than the server's limit of {self.max_body_bytes} bytes",
            code="request_too_large",
        )
        # Close the connection: the rest of the body is not worth reading.
        await error.response(headers={"Connection": "close"})(scope, receive, send)

    async def _too_slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            408,
            f"the request body did not arrive within {self.body_timeout_s:g} s of its headers",
            code="request_timeout",
        )
        await error.response(headers={"Connection": "close"})(scope, receive, send)


async def _drain(receive: Receive, already: int = 0) -> None:
    """Read and discard the rest of a refused body (up to DRAIN_LIMIT_BYTES in all).

    Answering while the client is still sending makes the server close a socket with unread
    data, which resets the connection: the client then sees a broken connection (and the
    OpenAI client retries it) instead of the 413. Discarding costs no memory.
    """
    size = already
    while size <= DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, pending: list[Message], receive: Receive) -> Receive:
    """A `receive` that hands out the buffered body once, then defers to the server's."""
    queue: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *pending]

    async def replay_receive() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay_receive
