"""TCP transport: ``[u32 big-endian length][payload]`` frames after an HMAC-SHA256 handshake.

Handshake (raw bytes, before any frame; nothing a peer sends is decoded until it passes)::

    server -> client   b"SHRDLNT1" + server_nonce(32)
    client -> server   HMAC(token, b"client" + server_nonce)(32) + client_nonce(32)
    server -> client   HMAC(token, b"server" + client_nonce)(32)     (only if the client passed)

A server that rejects a client logs it and closes the socket (the client then sees
`AuthenticationError`); the client checks the server's proof too. One :class:`TcpTransport`
serves both the event loop (non-blocking socket + `anyio.wait_readable/writable`) and plain
worker loops (the same socket with `select` waits), so both ends always speak the same bytes.
Receives keep partial frames in the transport, so cancelling a pending `recv` loses nothing;
sends are shielded so a frame is never cut in half.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

from shardline.transport.base import DEFAULT_MAX_MESSAGE_SIZE, Frame, Listener, Transport
from shardline.transport.errors import (
    AuthenticationError,
    MessageTooLarge,
    TransportBroken,
    TransportClosed,
    TransportError,
)

log = logging.getLogger(__name__)

MAGIC = b"SHRDLNT1"
# A frame header with this length is not a frame but an orderly goodbye: EOF after it is a
# close (TransportClosed); EOF without it means the peer vanished (TransportBroken).
GOODBYE = 0xFFFFFFFF
NONCE_SIZE = MAC_SIZE = 32
HANDSHAKE_TIMEOUT = 5.0


def _mac(token: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, role + nonce, hashlib.sha256).digest()


class TcpTransport(Transport):
    """One authenticated TCP connection; async and blocking APIs on the same socket."""

    def __init__(self, sock: socket.socket, *, max_message_size: int) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.max_message_size = max_message_size
        self._header = bytearray(4)
        self._header_got = 0
        self._payload: bytearray | None = None
        self._payload_got = 0
        self._send_lock = threading.Lock()
        self._mid_frame = False  # an async send is suspended half-way through a frame
        self._closed = False
        self._broken: TransportError | None = None

    # -- receiving: a resumable state machine over recv_into -----------------------------

    def _pump(self) -> Frame | None:
        """Read what the socket has; the next complete frame, or None if more is needed."""
        if self._closed:
            raise TransportClosed("this end is closed")
        if self._broken is not None:
            raise self._broken
        try:
            while True:
                if self._payload is None:
                    got = self._sock.recv_into(memoryview(self._header)[self._header_got :])
                    self._eof_check(got, partial=self._header_got > 0)
                    self._header_got += got
                    if self._header_got < 4:
                        continue
                    size = int.from_bytes(self._header, "big")
                    if size == GOODBYE:
                        self._broken = TransportClosed("the peer closed the connection")
                        raise self._broken
                    if size > self.max_message_size:
                        self._broken = MessageTooLarge(
                            f"peer sent a {size}-byte frame; maximum is {self.max_message_size}"
                        )
                        raise self._broken
                    self._payload, self._payload_got = bytearray(size), 0
                if self._payload_got < len(self._payload):
                    view = memoryview(self._payload)[self._payload_got :]
                    got = self._sock.recv_into(view)
                    self._eof_check(got, partial=True)
                    self._payload_got += got
                if self._payload_got == len(self._payload):
                    frame, self._payload, self._header_got = self._payload, None, 0
                    return frame
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._broken = TransportBroken(f"tcp connection failed: {exc}")
            raise self._broken from exc

    def _eof_check(self, got: int, *, partial: bool) -> None:
        if got == 0:
            where = "mid-frame" if partial else "without saying goodbye (process died?)"
            self._broken = TransportBroken(f"the peer's connection ended {where}")
            raise self._broken

    async def recv_frame(self) -> Frame:
        """The next frame, waiting without blocking the loop; cancel-safe."""
        while (frame := self._pump()) is None:
            try:
                await anyio.wait_readable(self._sock)
            except (OSError, anyio.ClosedResourceError) as exc:
                raise TransportClosed(f"tcp socket closed: {exc}") from exc
        return frame

    def recv_frame_blocking(self, timeout: float | None = None) -> Frame:
        """The next frame, blocking this thread; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (frame := self._pump()) is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no message arrived before the timeout")
            self._select(readable=True, timeout=remaining)
        return frame

    def _select(self, *, readable: bool, timeout: float | None) -> None:
        # Wake up at least every 0.1 s so a close() from another thread is noticed.
        slice_s = 0.1 if timeout is None else min(timeout, 0.1)
        try:
            if readable:
                select.select([self._sock], [], [], slice_s)
            else:
                select.select([], [self._sock], [], slice_s)
        except (OSError, ValueError) as exc:  # ValueError: the fd was closed under us
            raise TransportClosed(f"tcp socket closed: {exc}") from exc

    # -- sending -------------------------------------------------------------------------

    def _send_some(self, views: list[memoryview]) -> list[memoryview]:
        if self._closed:
            raise TransportClosed("this end is closed")
        try:
            sent = self._sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            return views
        except OSError as exc:
            raise TransportBroken(f"tcp send failed: {exc}") from exc
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views = views[1:]
        if views and sent:
            views = [views[0][sent:], *views[1:]]
        return views

    def _frame_views(self, frame: Frame) -> list[memoryview]:
        self._check_size(frame)
        header = len(frame).to_bytes(4, "big")
        return [memoryview(header), memoryview(frame).cast("B")]

    def send_frame_blocking(self, frame: Frame) -> None:
        """Send one frame, blocking this thread (thread-safe)."""
        views = self._frame_views(frame)
        with self._send_lock:
            while views := self._send_some(views):
                self._select(readable=False, timeout=None)

    async def send_frame(self, frame: Frame) -> None:
        """Send one frame without blocking the loop (shielded: frames are never cut)."""
        views = self._frame_views(frame)
        with anyio.CancelScope(shield=True):
            while views := self._send_some(views):
                self._mid_frame = True
                try:
                    await anyio.wait_writable(self._sock)
                except (OSError, anyio.ClosedResourceError) as exc:
                    raise TransportClosed(f"tcp socket closed: {exc}") from exc
            self._mid_frame = False

    def close(self) -> None:
        """Close the socket (idempotent); the peer sees `TransportClosed`."""
        if self._closed:
            return
        self._closed = True
        if not self._mid_frame and self._send_lock.acquire(timeout=1.0):  # never cut a frame
            with contextlib.suppress(OSError):
                self._sock.send(GOODBYE.to_bytes(4, "big"))
            self._send_lock.release()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()

    async def aclose(self) -> None:
        """Close the socket, telling the event loop first so no waiter is left on its fd."""
        if not self._closed:
            with contextlib.suppress(Exception):
                anyio.notify_closing(self._sock)
        self.close()


# -- handshake -------------------------------------------------------------------------


def _recv_exact_blocking(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AuthenticationError("the server closed the connection during authentication")
        data += chunk
    return data


def client_handshake(sock: socket.socket, token: bytes, timeout: float) -> None:
    """Prove we hold `token` and check that the server does too (blocking)."""
    deadline = time.monotonic() + timeout
    try:
        hello = _recv_exact_blocking(sock, len(MAGIC) + NONCE_SIZE, deadline)
        if not hello.startswith(MAGIC):
            raise AuthenticationError("the server did not speak the shardline tcp protocol")
        client_nonce = os.urandom(NONCE_SIZE)
        sock.sendall(_mac(token, b"client", hello[len(MAGIC) :]) + client_nonce)
        proof = _recv_exact_blocking(sock, MAC_SIZE, deadline)
    except (OSError, TimeoutError) as exc:
        raise AuthenticationError(f"authentication with the server failed: {exc}") from exc
    if not hmac.compare_digest(proof, _mac(token, b"server", client_nonce)):
        raise AuthenticationError("the server could not prove it holds the token")


async def recv_exact(
    sock: socket.socket,
    size: int,
    closed_message: str = "the client closed the connection during authentication",
) -> bytes:
    """Read exactly `size` bytes from a non-blocking socket; ConnectionError on early EOF."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(sock)
            continue
        if not chunk:
            raise ConnectionError(closed_message)
        data += chunk
    return data


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)


async def server_handshake(sock: socket.socket, token: bytes) -> bool:
    """Challenge a new client; False (logged) if it failed, timed out or sent garbage."""
    server_nonce = os.urandom(NONCE_SIZE)
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await _send_all(sock, MAGIC + server_nonce)
            reply = await recv_exact(sock, MAC_SIZE + NONCE_SIZE)
            if not hmac.compare_digest(reply[:MAC_SIZE], _mac(token, b"client", server_nonce)):
                log.warning("tcp: refused a client with a wrong token or garbage bytes")
                return False
            await _send_all(sock, _mac(token, b"server", reply[MAC_SIZE:]))
            return True
    except (OSError, TimeoutError) as exc:
        log.warning("tcp: dropped a client during authentication: %s", exc)
        return False


class TcpListener(Listener):
    """Listens on host:port (127.0.0.1 by default) and accepts authenticated peers only."""

    def __init__(
        self,
        token: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if not token:
            raise ValueError("a tcp listener needs a non-empty token")
        self.token, self.max_message_size = token, max_message_size
        try:
            self._sock = socket.create_server((host, port), backlog=128)
        except OSError as exc:
            raise TransportBroken(f"cannot listen on {host}:{port}: {exc}") from exc
        self._sock.setblocking(False)
        self.host, self.port = self._sock.getsockname()[:2]
        self.address: dict[str, Any] = {
            "kind": "tcp",
            "host": self.host,
            "port": self.port,
            "max_message_size": max_message_size,
        }
        self._closed = False

    async def accept_until(self, on_peer: Callable[[TcpTransport], Awaitable[bool]]) -> None:
        """Accept authenticated peers, handing each to `on_peer` in its own task, until one
        call returns True. Handshakes run concurrently; failed ones are logged and dropped."""

        async def authenticate(sock: socket.socket) -> None:
            try:
                sock.setblocking(False)
                authenticated = await server_handshake(sock, self.token)
            except BaseException:  # cancelled mid-handshake: the socket is ours to close
                sock.close()
                raise
            if not authenticated:
                sock.close()
                return
            if await on_peer(TcpTransport(sock, max_message_size=self.max_message_size)):
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            while True:
                try:
                    sock, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    try:
                        await anyio.wait_readable(self._sock)
                    except (OSError, anyio.ClosedResourceError) as exc:
                        raise TransportClosed(f"tcp listener closed: {exc}") from exc
                    continue
                except OSError as exc:
                    raise TransportClosed(f"tcp listener closed: {exc}") from exc
                tg.start_soon(authenticate, sock)

    async def accept_many(self, count: int) -> list[TcpTransport]:
        """The next `count` authenticated peers."""
        accepted: list[TcpTransport] = []

        async def keep(transport: TcpTransport) -> bool:
            if len(accepted) >= count:  # two finished in the same instant: keep count exact
                transport.close()
            else:
                accepted.append(transport)
            return len(accepted) >= count

        await self.accept_until(keep)
        return accepted

    async def accept(self) -> Transport:
        """The next authenticated peer."""
        return (await self.accept_many(1))[0]

    async def aclose(self) -> None:
        """Stop listening (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            anyio.notify_closing(self._sock)
        self._sock.close()


def connect_blocking(
    address: dict[str, Any], token: bytes | None, timeout: float = 30.0
) -> TcpTransport:
    """Connect and authenticate (blocking); `AuthenticationError` if refused."""
    host, port = str(address["host"]), int(address["port"])
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TransportBroken(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        client_handshake(sock, token or b"", timeout)
    except BaseException:
        sock.close()
        raise
    max_size = int(address.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE))
    return TcpTransport(sock, max_message_size=max_size)


async def connect(
    address: dict[str, Any], token: bytes | None, connect_timeout: float = 30.0
) -> TcpTransport:
    """Connect and authenticate without blocking the event loop."""
    transport: TcpTransport = await anyio.to_thread.run_sync(
        connect_blocking, address, token, connect_timeout
    )
    return transport
