"""A TCP relay on 127.0.0.1 for tests: forwards connections to a target, records every byte
both ways, and can change bytes in transit (a man in the middle on one machine)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

# (direction "up" = client -> target or "down" = target -> client, offset in that stream, data)
Tamper = Callable[[str, int, bytes], bytes]


class Relay:
    """Listens on 127.0.0.1:`port`; each connection is piped to `target` by two threads.

    `captured[direction]` holds every byte seen in that direction (all connections, in
    arrival order); `tamper`, if given, may replace each chunk before it is forwarded."""

    def __init__(self, target: tuple[str, int], tamper: Tamper | None = None) -> None:
        self.target = target
        self.tamper = tamper
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # so the accept thread notices close()
        self.port: int = self._listener.getsockname()[1]
        self.captured: dict[str, bytearray] = {"up": bytearray(), "down": bytearray()}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        accept = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            for direction, src, dst in (("up", client, upstream), ("down", upstream, client)):
                pipe = threading.Thread(
                    target=self._pipe, args=(direction, src, dst), name=f"relay-{direction}",
                    daemon=True,
                )  # fmt: skip
                pipe.start()
                self._threads.append(pipe)

    def _pipe(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        offset = 0
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with self._lock:
                self.captured[direction] += data
            out = self.tamper(direction, offset, data) if self.tamper else data
            offset += len(data)
            try:
                dst.sendall(out)
            except OSError:
                return

    def bytes(self, direction: str) -> bytes:
        with self._lock:
            return bytes(self.captured[direction])

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
