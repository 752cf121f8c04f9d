"""Slow and idle clients: a header read timeout and a connection cap for uvicorn.

uvicorn bounds neither how long a client may take to send a request's headers nor how many
connections it holds open (`limit_concurrency` answers 503 only once a request's headers are
in, so connections that never finish their headers are never refused), so a few hundred idle
or slow-header ("slowloris") connections stay open for as long as their clients like, each a
descriptor. `guarded_h11_protocol` is uvicorn's h11 protocol with:

* a header timeout: from the moment a connection opens, and again from the end of each
  response (keep-alive), the next request's headers must be complete within
  `header_timeout_s`; otherwise the connection is closed, with a 408 if part of a request had
  arrived (an idle connection is closed silently, as at the end of a keep-alive);
* a connection cap: a connection made while `max_connections` are open is answered 503 and
  closed at once.

The request body's own deadline is the gatekeeper's (`middleware.GatekeeperMiddleware`,
`body_timeout_s`), since it is the one place that reads bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("shardline.server")

DEFAULT_HEADER_TIMEOUT_S = 10.0
"""Seconds a client has to send a request's headers (from connect, or from the previous
response's end on a kept-alive connection)."""
DEFAULT_BODY_TIMEOUT_S = 30.0
"""Seconds a client has to send a whole request body once its headers are in (4 MiB, the
default body limit, in 30 s is 140 KB/s)."""
DEFAULT_MAX_CONNECTIONS = 1024
"""Open HTTP connections at most; one more is answered 503 and closed."""

REFUSAL_LOG_PERIOD_S = 10.0  # at most one warning this often about refused or timed-out clients


def _raw_error(status: int, reason: str, message: str, code: str, error_type: str) -> bytes:
    """A whole HTTP/1.1 error response (OpenAI's error JSON) that closes the connection;
    written straight to the socket, outside h11's request cycle."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode("ascii") + body


class _RateLimitedWarning:
    """One warning per period, counting the events it stood for."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.last: float | None = None
        self.pending = 0

    def __call__(self, message: str) -> None:
        self.pending += 1
        now = time.monotonic()
        if self.last is None or now - self.last >= self.period_s:
            log.warning("%s (%d since the last such warning)", message, self.pending)
            self.last = now
            self.pending = 0


def guarded_h11_protocol(*, header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a header timeout and a connection cap (for
    `uvicorn.Config(http=...)`). Each server gets its own class, holding its settings."""
    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    too_many = _raw_error(503, "Service Unavailable",
                          f"the server has {max_connections} connections open, its limit; retry later",
                          "too_many_connections", "service_unavailable")  # fmt: skip
    too_slow = _raw_error(408, "Request Timeout",
                          f"the request's headers did not arrive within {header_timeout_s:g} s",
                          "request_timeout", "invalid_request_error")  # fmt: skip
    warn_refused = _RateLimitedWarning(REFUSAL_LOG_PERIOD_S)
    warn_slow = _RateLimitedWarning(REFUSAL_LOG_PERIOD_S)

    class GuardedH11Protocol(H11Protocol):
        header_timeout = header_timeout_s
        connection_limit = max_connections

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._partial_request = False  # bytes of the next request arrived, headers unfinished
            self._refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= self.connection_limit:
                # Not added to `connections`: a refused connection does not count.
                self._refused = True
                self.transport = transport
                warn_refused(f"refused HTTP connections over the limit of {self.connection_limit}")
                transport.write(too_many)
                transport.close()
                return
            super().connection_made(transport)
            self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            if self._refused:
                return
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._header_timer is not None:
                self._partial_request = True
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in: its cycle started
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._wait_for_headers()  # the next request on this connection
            super().on_response_complete()  # may start a pipelined request (stops the timer)

        def _wait_for_headers(self) -> None:
            self._stop_header_timer()
            self._partial_request = False
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._partial_request:
                warn_slow(f"closed HTTP connections whose request headers took over {self.header_timeout:g} s")
                self.transport.write(too_slow)
            self.transport.close()

    return GuardedH11Protocol
