"""TCP transport: authenticated, integrity-checked frames after an HMAC-SHA256 handshake,
optionally inside mutual TLS.

Handshake (raw bytes, before any frame; nothing a peer sends is decoded until it passes)::

    server -> client   b"SHRDLNT2" + server_nonce(32)
    client -> server   HMAC(token, b"client" + server_nonce)(32) + client_nonce(32)
    server -> client   HMAC(token, b"server" + client_nonce)(32)     (only if the client passed)

The token itself never crosses the wire. Both ends then derive a session key from the token
and both nonces (HKDF-SHA256, `session_key`), and every frame carries a sequence number and
an HMAC-SHA256 tag with that key::

    [u32 length][u64 seq][payload][HMAC(session_key, direction + length + seq + payload)(32)]

`direction` is b"C" for client -> server frames and b"S" for server -> client ones. The
receiver recomputes the tag and expects seq 0, 1, 2, ... in order: a changed frame (or one
from another connection or direction), a replayed one and a reordered or missing one are each
refused as `TransportBroken` naming which, and the link stays broken. The orderly goodbye is
a tagged frame too (length ``0xFFFFFFFF``, no payload), so a forged one is refused rather than
read as a close.

With a `TlsConfig` (certificate, key, CA) the socket is wrapped in TLS first, both sides
presenting a certificate signed by the CA (mutual TLS, stdlib `ssl`); the token handshake and
the frame tags run inside it unchanged. Certificates are checked against the CA, not against
host names (nodes are reached by address): every holder of a certificate the CA signed counts
as a member of the cluster, and must also hold the token.

A server that rejects a client logs it and closes the socket (the client then sees
`AuthenticationError`); the client checks the server's proof too. One :class:`TcpTransport`
serves both the event loop (non-blocking socket + `anyio.wait_readable/writable`) and plain
worker loops (the same socket with `select` waits), so both ends always speak the same bytes.
Receives keep partial frames in the transport, so cancelling a pending `recv` loses nothing;
sends are shielded so a frame is never cut in half.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
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

MAGIC = b"SHRDLNT2"
# A frame header with this length is not a frame but an orderly goodbye: EOF after it is a
# close (TransportClosed); EOF without it means the peer vanished (TransportBroken).
GOODBYE = 0xFFFFFFFF
NONCE_SIZE = MAC_SIZE = 32
TAG_SIZE = 32  # HMAC-SHA256 of each frame
HANDSHAKE_TIMEOUT = 5.0
SESSION_INFO = b"shardline tcp session v2"
CLIENT_TO_SERVER, SERVER_TO_CLIENT = b"C", b"S"
_SMALL_FRAME = 64 << 10  # TLS: frames up to this size go out as one record (one write)
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class WrongToken(AuthenticationError):
    """The peer answered the token challenge with a wrong proof (a different token, or bytes
    that are not a proof at all)."""


def _mac(token: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, role + nonce, hashlib.sha256).digest()


def session_key(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869): the token keyed by both handshake nonces, one 32-byte key per
    connection (so a frame of one connection is worthless on any other)."""
    prk = hmac.new(server_nonce + client_nonce, token, hashlib.sha256).digest()
    return hmac.new(prk, SESSION_INFO + b"\x01", hashlib.sha256).digest()


@dataclasses.dataclass(frozen=True, repr=False)
class Session:
    """What an authenticated connection's frames are tagged with: the session key and which
    end of the connection this is (the accepting end is the server)."""

    key: bytes
    server: bool

    def __repr__(self) -> str:  # never print the key
        return f"Session(server={self.server})"


# -- TLS ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS for node links: this end's certificate and key, and the CA that signed every
    end's certificate (PEM files). Only paths travel (never key material)."""

    certfile: str
    keyfile: str
    ca_certs: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TlsConfig:
        return cls(str(data["certfile"]), str(data["keyfile"]), str(data["ca_certs"]))

    def absolute(self) -> TlsConfig:
        """The same files by absolute path (for a process that may run elsewhere)."""
        return TlsConfig(*(os.path.abspath(p) for p in (self.certfile, self.keyfile, self.ca_certs)))

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(purpose, cafile=self.ca_certs)
            context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load TLS files (certfile {self.certfile}, keyfile {self.keyfile}, "
                f"CA {self.ca_certs}): {exc}"
            ) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False  # nodes are reached by address; the CA decides
        context.verify_mode = ssl.CERT_REQUIRED  # both ways: mutual TLS
        return context

    def server_context(self) -> ssl.SSLContext:
        """For the accepting end: presents our certificate, requires the peer's."""
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        """For the connecting end: presents our certificate, checks the server's."""
        return self._context(ssl.Purpose.SERVER_AUTH)


def _server_context(tls: TlsConfig | ssl.SSLContext | None) -> ssl.SSLContext | None:
    return tls.server_context() if isinstance(tls, TlsConfig) else tls


def _client_context(tls: TlsConfig | ssl.SSLContext | None) -> ssl.SSLContext | None:
    return tls.client_context() if isinstance(tls, TlsConfig) else tls


async def tls_accept(sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
    """TLS server handshake on an accepted non-blocking socket (within HANDSHAKE_TIMEOUT).

    Takes over `sock` (closed on failure); `AuthenticationError` naming why it failed."""
    sock.setblocking(False)
    try:
        tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        sock.close()
        raise AuthenticationError(f"TLS handshake failed: {exc}") from exc
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            while True:
                try:
                    tls_sock.do_handshake()
                    return tls_sock
                except ssl.SSLWantReadError:
                    await anyio.wait_readable(tls_sock)
                except ssl.SSLWantWriteError:
                    await anyio.wait_writable(tls_sock)
    except (OSError, TimeoutError) as exc:
        tls_sock.close()
        what = "no TLS handshake" if isinstance(exc, TimeoutError) else "TLS handshake failed"
        raise AuthenticationError(f"{what}: {exc}") from exc
    except BaseException:
        tls_sock.close()
        raise


def tls_connect(sock: socket.socket, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    """TLS client handshake on a connected socket (blocking). Takes over `sock` (closed on
    failure); `AuthenticationError` naming why it failed."""
    sock.settimeout(timeout)
    try:
        return context.wrap_socket(sock)
    except (OSError, ValueError) as exc:
        sock.close()
        raise AuthenticationError(
            f"TLS handshake failed: {exc} (do both ends use TLS with the same CA?)"
        ) from exc


class TcpTransport(Transport):
    """One authenticated TCP connection; async and blocking APIs on the same socket.

    `session` None sends plain ``[u32 length][payload]`` frames without tags: only for
    measuring what the tags cost (benchmarks/transport_bench.py); every link this package
    makes has a session."""

    def __init__(
        self, sock: socket.socket, *, max_message_size: int, session: Session | None
    ) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.max_message_size = max_message_size
        self._session = session
        self._header_size = 4 if session is None else 12
        self._tag_size = 0 if session is None else TAG_SIZE
        self._send_mac: Any = None  # hmac.HMAC keyed with the session key, direction fed in
        self._recv_mac: Any = None
        if session is not None:
            ours, theirs = (
                (SERVER_TO_CLIENT, CLIENT_TO_SERVER)
                if session.server
                else (CLIENT_TO_SERVER, SERVER_TO_CLIENT)
            )
            self._send_mac = hmac.new(session.key, ours, hashlib.sha256)
            self._recv_mac = hmac.new(session.key, theirs, hashlib.sha256)
        self._send_seq = self._recv_seq = 0
        self._header = bytearray(self._header_size)
        self._header_got = 0
        self._payload: bytearray | None = None  # payload + tag of the frame being received
        self._payload_got = 0
        self._send_lock = threading.Lock()
        self._async_send_lock: anyio.Lock | None = None
        self._mid_frame = False  # an async send is suspended half-way through a frame
        self._closed = False
        self._broken: TransportError | None = None

    @property
    def tls(self) -> bool:
        """Whether the connection runs inside TLS."""
        return self._tls

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
                    if self._header_got < self._header_size:
                        continue
                    size = int.from_bytes(self._header[:4], "big")
                    if size == GOODBYE:
                        if self._session is None:
                            self._broken = TransportClosed("the peer closed the connection")
                            raise self._broken
                        size = 0  # a tagged goodbye: its tag follows
                    elif size > self.max_message_size:
                        self._broken = MessageTooLarge(
                            f"peer sent a {size}-byte frame; maximum is {self.max_message_size}"
                        )
                        raise self._broken
                    self._payload, self._payload_got = bytearray(size + self._tag_size), 0
                if self._payload_got < len(self._payload):
                    # A temporary view: none may outlive this call (_verify resizes the buffer).
                    got = self._sock.recv_into(memoryview(self._payload)[self._payload_got :])
                    self._eof_check(got, partial=True)
                    self._payload_got += got
                if self._payload_got == len(self._payload):
                    frame, self._payload, self._header_got = self._payload, None, 0
                    if self._session is not None:
                        self._verify(frame)
                    return frame
        except _WOULD_BLOCK:
            return None
        except OSError as exc:
            self._broken = TransportBroken(f"tcp connection failed: {exc}")
            raise self._broken from exc

    def _verify(self, frame: bytearray) -> None:
        """Check the tag and the sequence number of the frame just read (payload + tag), then
        cut the tag off; a goodbye that passes raises TransportClosed."""
        assert self._recv_mac is not None
        size = len(frame) - TAG_SIZE
        mac = self._recv_mac.copy()
        mac.update(self._header)
        mac.update(memoryview(frame)[:size])
        expected = self._recv_seq
        if not hmac.compare_digest(mac.digest(), memoryview(frame)[size:]):
            self._broken = TransportBroken(
                f"frame {expected} failed its integrity check (HMAC-SHA256 tag mismatch): it "
                "was changed in transit or does not come from the authenticated peer"
            )
            raise self._broken
        seq = int.from_bytes(self._header[4:12], "big")
        if seq != expected:
            if seq < expected:
                why = f"replayed frame: sequence number {seq} again (expected {expected})"
            else:
                why = (
                    f"frame out of order: sequence number {seq}, expected {expected} "
                    "(frames were dropped or reordered)"
                )
            self._broken = TransportBroken(why)
            raise self._broken
        self._recv_seq += 1
        if int.from_bytes(self._header[:4], "big") == GOODBYE:
            self._broken = TransportClosed("the peer closed the connection")
            raise self._broken
        del frame[size:]

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
            if self._tls:  # no sendmsg on TLS sockets; a WANT_WRITE retries the same view
                sent = self._sock.send(views[0])
            else:
                sent = self._sock.sendmsg(views)
        except _WOULD_BLOCK:
            return views
        except OSError as exc:
            raise TransportBroken(f"tcp send failed: {exc}") from exc
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views = views[1:]
        if views and sent:
            views = [views[0][sent:], *views[1:]]
        return views

    def _frame_views(self, frame: Frame, size: int | None = None) -> list[memoryview]:
        """The frame's bytes on the wire; with a session this takes the next sequence number,
        so call it only where the frame then goes out in order (under the send lock)."""
        payload = memoryview(frame).cast("B")
        length = len(payload) if size is None else size
        if self._send_mac is None:
            return [memoryview(length.to_bytes(4, "big")), payload]
        header = length.to_bytes(4, "big") + self._send_seq.to_bytes(8, "big")
        self._send_seq += 1
        mac = self._send_mac.copy()
        mac.update(header)
        mac.update(payload)
        tag = mac.digest()
        if self._tls and len(payload) <= _SMALL_FRAME:  # one TLS record, not three
            return [memoryview(b"".join((header, payload, tag)))]
        return [memoryview(header), payload, memoryview(tag)]

    def send_frame_blocking(self, frame: Frame) -> None:
        """Send one frame, blocking this thread (thread-safe)."""
        self._check_size(frame)
        with self._send_lock:
            views = self._frame_views(frame)
            while views := self._send_some(views):
                self._select(readable=False, timeout=None)

    async def send_frame(self, frame: Frame) -> None:
        """Send one frame without blocking the loop (shielded: frames are never cut; sends
        from several tasks go out one whole frame at a time, in sequence order)."""
        self._check_size(frame)
        if self._async_send_lock is None:
            self._async_send_lock = anyio.Lock()
        lock = self._async_send_lock
        with anyio.CancelScope(shield=True):
            try:
                lock.acquire_nowait()  # the usual case: no other task is sending
            except anyio.WouldBlock:
                await lock.acquire()
            try:
                self._mid_frame = True
                views = self._frame_views(frame)
                while views := self._send_some(views):
                    try:
                        await anyio.wait_writable(self._sock)
                    except (OSError, anyio.ClosedResourceError) as exc:
                        raise TransportClosed(f"tcp socket closed: {exc}") from exc
            finally:
                self._mid_frame = False
                lock.release()

    def close(self) -> None:
        """Close the socket (idempotent); the peer sees `TransportClosed`."""
        if self._closed:
            return
        self._closed = True
        if not self._mid_frame and self._send_lock.acquire(timeout=1.0):  # never cut a frame
            with contextlib.suppress(OSError, ValueError):
                self._sock.send(b"".join(self._frame_views(b"", size=GOODBYE)))
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


def client_handshake(sock: socket.socket, token: bytes, timeout: float) -> Session:
    """Prove we hold `token` and check that the server does too (blocking); the session."""
    deadline = time.monotonic() + timeout
    try:
        hello = _recv_exact_blocking(sock, len(MAGIC) + NONCE_SIZE, deadline)
        if not hello.startswith(MAGIC):
            raise AuthenticationError("the server did not speak the shardline tcp protocol")
        server_nonce = hello[len(MAGIC) :]
        client_nonce = os.urandom(NONCE_SIZE)
        sock.sendall(_mac(token, b"client", server_nonce) + client_nonce)
        proof = _recv_exact_blocking(sock, MAC_SIZE, deadline)
    except (OSError, TimeoutError) as exc:
        raise AuthenticationError(f"authentication with the server failed: {exc}") from exc
    if not hmac.compare_digest(proof, _mac(token, b"server", client_nonce)):
        raise AuthenticationError("the server could not prove it holds the token")
    return Session(session_key(token, server_nonce, client_nonce), server=False)


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
        except _WOULD_BLOCK:
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
        except _WOULD_BLOCK:
            await anyio.wait_writable(sock)


async def server_authenticate(sock: socket.socket, token: bytes) -> Session:
    """Challenge a new client (within HANDSHAKE_TIMEOUT); its session, or `WrongToken` (a
    wrong proof) or `AuthenticationError` (silence, early close, socket errors) naming why."""
    server_nonce = os.urandom(NONCE_SIZE)
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await _send_all(sock, MAGIC + server_nonce)
            reply = await recv_exact(sock, MAC_SIZE + NONCE_SIZE)
            if not hmac.compare_digest(reply[:MAC_SIZE], _mac(token, b"client", server_nonce)):
                raise WrongToken("wrong token (or bytes that are no proof of the token)")
            client_nonce = reply[MAC_SIZE:]
            await _send_all(sock, _mac(token, b"server", client_nonce))
    except TimeoutError as exc:
        raise AuthenticationError(f"no answer to the challenge within {HANDSHAKE_TIMEOUT} s") from exc
    except OSError as exc:
        raise AuthenticationError(str(exc) or type(exc).__name__) from exc
    return Session(session_key(token, server_nonce, client_nonce), server=True)


async def server_handshake(sock: socket.socket, token: bytes) -> Session | None:
    """Challenge a new client; its session, or None (logged) if it failed, timed out or sent
    garbage."""
    try:
        return await server_authenticate(sock, token)
    except WrongToken:
        log.warning("tcp: refused a client with a wrong token or garbage bytes")
    except AuthenticationError as exc:
        log.warning("tcp: dropped a client during authentication: %s", exc)
    return None


class TcpListener(Listener):
    """Listens on host:port (127.0.0.1 by default) and accepts authenticated peers only
    (inside mutual TLS when given `tls`)."""

    def __init__(
        self,
        token: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        tls: TlsConfig | ssl.SSLContext | None = None,
    ) -> None:
        if not token:
            raise ValueError("a tcp listener needs a non-empty token")
        self.token, self.max_message_size = token, max_message_size
        self._tls = _server_context(tls)
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
        if self._tls is not None:
            self.address["tls"] = True  # peers must connect with a certificate of the CA
        self._closed = False

    async def accept_until(self, on_peer: Callable[[TcpTransport], Awaitable[bool]]) -> None:
        """Accept authenticated peers, handing each to `on_peer` in its own task, until one
        call returns True. Handshakes run concurrently; failed ones are logged and dropped."""

        async def authenticate(sock: socket.socket) -> None:
            try:
                sock.setblocking(False)
                if self._tls is not None:
                    try:
                        sock = await tls_accept(sock, self._tls)
                    except AuthenticationError as exc:
                        log.warning("tcp: dropped a client: %s", exc)
                        return
                session = await server_handshake(sock, self.token)
            except BaseException:  # cancelled mid-handshake: the socket is ours to close
                sock.close()
                raise
            if session is None:
                sock.close()
                return
            transport = TcpTransport(sock, max_message_size=self.max_message_size, session=session)
            if await on_peer(transport):
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
    address: dict[str, Any],
    token: bytes | None,
    timeout: float = 30.0,
    *,
    tls: TlsConfig | ssl.SSLContext | None = None,
) -> TcpTransport:
    """Connect and authenticate (blocking); `AuthenticationError` if refused. A listener
    whose address says ``tls`` needs `tls` (this end's certificate, key and CA)."""
    host, port = str(address["host"]), int(address["port"])
    context = _client_context(tls) if address.get("tls") else None
    if address.get("tls") and context is None:
        raise AuthenticationError(
            f"{host}:{port} requires TLS but this end was given no certificate, key and CA"
        )
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TransportBroken(f"cannot connect to {host}:{port}: {exc}") from exc
    if context is not None:
        sock = tls_connect(sock, context, timeout)
    try:
        session = client_handshake(sock, token or b"", timeout)
    except BaseException:
        sock.close()
        raise
    max_size = int(address.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE))
    return TcpTransport(sock, max_message_size=max_size, session=session)


async def connect(
    address: dict[str, Any],
    token: bytes | None,
    connect_timeout: float = 30.0,
    *,
    tls: TlsConfig | ssl.SSLContext | None = None,
) -> TcpTransport:
    """Connect and authenticate without blocking the event loop."""

    def run() -> TcpTransport:
        return connect_blocking(address, token, connect_timeout, tls=tls)

    transport: TcpTransport = await anyio.to_thread.run_sync(run)
    return transport
