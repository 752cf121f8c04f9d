"""Engine <-> worker channels: what the executor uses (docs/INTERFACES.md section 2).

Per kind:

* ``inproc``: one in-process link per rank; workers are threads of the engine's process.
* ``shm``: one broadcast ring (engine -> all ranks) and one ring per rank (rank -> engine).
  `send_to(rank)` travels on the broadcast ring too, tagged with its target, so a worker sees
  broadcasts and its own messages in exactly the order the engine sent them; other ranks skip it.
  The engine creates (and on close unlinks) every ring; a worker whose engine was killed
  unlinks their names itself (`WorkerChannels.unlink_shm_names`).
* ``tcp``: one authenticated connection per rank; a broadcast is N sends.
* ``mixed`` (``shm`` with ``tcp_ranks``, for runs across nodes): ranks on the engine's node use
  the shm rings (reader index = position in ``shm_ranks``), the others (``tcp_ranks``, on other
  machines) one authenticated TCP connection each. A broadcast is one ring write plus one send
  per TCP rank; `recv` merges both. Order per rank is preserved, which is all a worker sees.

Every worker's first frame is ``Hello(rank, world_size, pid)``; the channel layer consumes it
(it never reaches `EngineChannels.recv`) and `wait_connected` waits for all of them.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Collection
from typing import Any, Literal

import anyio

from shardline.transport import inproc, shm, tcp
from shardline.transport.base import AsyncResource, Frame, Transport
from shardline.transport.errors import TransportBroken, TransportClosed, TransportError
from shardline.transport.messages import Hello, Message, decode, encode
from shardline.transport.shm_ring import Ring, ring_names, unlink_names

Kind = Literal["inproc", "shm", "tcp", "mixed"]
_TO_ALL = 0xFFFFFFFF
_TARGET = 4  # bytes of the shm broadcast-ring target prefix
_inproc_registry: dict[str, dict[int, inproc.InprocTransport]] = {}


def _target_prefix(rank: int) -> bytes:
    return rank.to_bytes(_TARGET, "little")


class EngineChannels(AsyncResource):
    """The engine's end: broadcast / send_to workers, receive from any of them."""

    def __init__(self, kind: Kind, num_workers: int, address: dict[str, Any]) -> None:
        self.kind, self.num_workers, self.address = kind, num_workers, address
        self._incoming: dict[int, Transport] = {}  # rank -> link the worker sends on
        self._outgoing: dict[int, Transport] = {}  # rank -> link to the worker (inproc/tcp)
        self._broadcast: shm.RingWriter | None = None
        self._greeted: set[int] = set()
        self._ready: deque[tuple[int, Frame]] = deque()
        self._error: TransportError | None = None
        self._listener: tcp.TcpListener | None = None
        self._shm_ranks: dict[int, int] = {}  # rank -> its reader index on the broadcast ring
        self._tcp_ranks: set[int] = set()  # ranks that attach through the listener
        self._closed = False

    # -- connection ----------------------------------------------------------------------

    def _greet(self, rank: int, frame: Frame) -> None:
        msg = decode(frame)
        if not isinstance(msg, Hello) or msg.rank != rank:
            raise TransportBroken(f"rank {rank} must first send Hello(rank={rank}), got {msg!r}")
        self._greeted.add(rank)

    async def wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109 - the contract
        """Return once every rank has attached; TimeoutError naming the missing ranks."""
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                if self._tcp_ranks - self._greeted:
                    tg.start_soon(self._accept_tcp)
                for rank in set(self._incoming) - self._tcp_ranks - self._greeted:
                    tg.start_soon(self._await_hello, rank)
        missing = sorted(set(range(self.num_workers)) - self._greeted)
        if missing:
            raise TimeoutError(f"workers {missing} did not connect within {timeout} s")

    async def _await_hello(self, rank: int) -> None:
        self._greet(rank, await self._incoming[rank].recv_frame())

    async def _accept_tcp(self) -> None:
        listener = self._listener
        if listener is None or self._tcp_ranks <= self._greeted:
            return

        async def on_peer(link: tcp.TcpTransport) -> bool:
            try:
                with anyio.fail_after(tcp.HANDSHAKE_TIMEOUT):
                    hello = decode(await link.recv_frame())
                if not isinstance(hello, Hello) or hello.rank not in self._tcp_ranks:
                    raise TransportBroken(
                        f"expected Hello from one of ranks {sorted(self._tcp_ranks)}"
                    )
                if hello.rank in self._greeted:
                    raise TransportBroken(f"rank {hello.rank} connected twice")
            except (TransportError, TimeoutError) as exc:
                tcp.log.warning("tcp: dropped an authenticated peer: %s", exc)
                await link.aclose()
                return False
            except BaseException:  # cancelled (wait_connected timed out): do not leak it
                await link.aclose()
                raise
            self._incoming[hello.rank] = self._outgoing[hello.rank] = link
            self._greeted.add(hello.rank)
            return self._tcp_ranks <= self._greeted

        await listener.accept_until(on_peer)
        await listener.aclose()

    # -- sending -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("engine channels are closed")

    async def broadcast(self, msg: Message) -> None:
        """Send `msg` to every worker (one ring write for the shm ranks, one send per link)."""
        self._check_open()
        frame = encode(msg)
        if self._broadcast is not None:
            await shm.write_async(self._broadcast, _target_prefix(_TO_ALL) + frame)
        for rank in range(self.num_workers):
            if rank not in self._shm_ranks:
                await self._link_to(rank).send_frame(frame)

    async def send_to(self, rank: int, msg: Message) -> None:
        """Send `msg` to one worker, ordered with respect to broadcasts."""
        self._check_open()
        if not 0 <= rank < self.num_workers:
            raise ValueError(f"rank {rank} out of range for {self.num_workers} workers")
        frame = encode(msg)
        if self._broadcast is not None and rank in self._shm_ranks:
            await shm.write_async(self._broadcast, _target_prefix(rank) + frame)
        else:
            await self._link_to(rank).send_frame(frame)

    def _link_to(self, rank: int) -> Transport:
        link = self._outgoing.get(rank)
        if link is None:
            raise TransportClosed(f"worker rank {rank} is not connected")
        return link

    # -- receiving -----------------------------------------------------------------------

    async def _pull(self, rank: int, link: Transport, scope: anyio.CancelScope | None) -> None:
        try:
            while True:
                frame = await link.recv_frame()
                if rank in self._greeted:
                    break
                self._greet(rank, frame)
        except TransportError as exc:
            if self._error is None:  # name the rank: the engine reports which worker failed
                if isinstance(exc, TransportClosed):
                    self._error = TransportBroken(f"worker rank {rank} closed its channel: {exc}")
                else:
                    self._error = type(exc)(f"worker rank {rank}'s channel failed: {exc}")
        else:
            self._ready.append((rank, frame))
        if scope is not None:
            scope.cancel()

    async def recv(self) -> tuple[int, Message]:
        """The next message from any worker, as (rank, message)."""
        self._check_open()
        if not self._ready and self._error is None:
            links = sorted(self._incoming.items())
            if not links:
                raise TransportClosed("no worker is connected")
            if len(links) == 1:
                await self._pull(*links[0], None)
            else:
                async with anyio.create_task_group() as tg:
                    for rank, link in links:
                        tg.start_soon(self._pull, rank, link, tg.cancel_scope)
        if self._ready:
            rank, frame = self._ready.popleft()
            return rank, decode(frame)
        assert self._error is not None
        raise self._error

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close everything (idempotent): workers are woken, shm names unlinked."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            await self._listener.aclose()
        if self._broadcast is not None:
            self._broadcast.close()
        for link in {
            id(t): t for t in [*self._incoming.values(), *self._outgoing.values()]
        }.values():
            await link.aclose()
        for unclaimed in _inproc_registry.pop(str(self.address.get("name")), {}).values():
            await unclaimed.aclose()



async def open_engine_channels(
    kind: Kind,
    num_workers: int,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: bytes | None = None,
    max_message_size: int = 256 << 20,
    tcp_ranks: Collection[int] = (),
    tls: tcp.TlsConfig | None = None,
) -> EngineChannels:
    """Create the engine's end of the channels; pass `.address` to every worker.

    With kind ``shm``, `tcp_ranks` (ranks on other machines) attach over authenticated TCP on
    `host`:`port` instead, the rest over shared memory: the ``mixed`` kind. With `tls` the TCP
    listener takes peers inside mutual TLS only. The address holds the token (and this end's
    TLS file paths) for ranks of this machine; strip them (`without_tcp_secrets`) before it
    travels to another one, whose launcher adds its own (`with_tcp_secrets`).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    remote = sorted(set(tcp_ranks))
    if remote and (remote[0] < 0 or remote[-1] >= num_workers):
        raise ValueError(f"tcp_ranks {remote} out of range for {num_workers} workers")
    if remote and kind != "shm" and (kind != "tcp" or len(remote) != num_workers):
        raise ValueError(f"tcp_ranks only combine with kind 'shm', not {kind!r}")
    if kind == "shm" and len(remote) == num_workers:
        kind = "tcp"  # nobody left on shared memory
    if kind == "shm" and remote:
        return _open_mixed(
            num_workers,
            remote,
            common_max=max_message_size,
            host=host,
            port=port,
            token=token,
            tls=tls,
        )
    common: dict[str, Any] = {
        "kind": kind,
        "num_workers": num_workers,
        "max_message_size": max_message_size,
    }
    if kind == "inproc":
        name = f"channels-{secrets.token_hex(8)}"
        channels = EngineChannels(kind, num_workers, {**common, "name": name})
        ends: dict[int, inproc.InprocTransport] = {}
        for rank in range(num_workers):
            ours, theirs = inproc.pipe(max_message_size=max_message_size)
            channels._incoming[rank] = channels._outgoing[rank] = ours
            ends[rank] = theirs
        _inproc_registry[name] = ends
        return channels
    if kind == "shm":
        channels = EngineChannels(kind, num_workers, dict(common))
        _add_shm(channels, list(range(num_workers)), max_message_size)
        return channels
    if kind == "tcp":
        channels = EngineChannels(kind, num_workers, dict(common))
        channels.address.update(
            _add_tcp(channels, range(num_workers), host, port, token, max_message_size, tls)
        )
        return channels
    raise ValueError(f"unknown transport kind {kind!r}; expected inproc, shm or tcp")


def _add_shm(channels: EngineChannels, ranks: list[int], max_message_size: int) -> None:
    """Give `ranks` (reader i = ranks[i]) a broadcast ring and one result ring each."""
    rings: list[Ring] = []
    try:
        rings.append(Ring.create(shm.DEFAULT_NSLOTS, shm.DEFAULT_SLOT_SIZE, len(ranks)))
        for _ in ranks:
            rings.append(Ring.create(16, 64 << 10, 1))
    except BaseException:
        for ring in rings:
            ring.close()
        raise
    channels.address["broadcast"] = rings[0].address
    channels.address["results"] = [ring.address for ring in rings[1:]]
    channels._broadcast = shm.RingWriter(rings[0])
    for index, (rank, ring) in enumerate(zip(ranks, rings[1:], strict=True)):
        channels._shm_ranks[rank] = index
        reader = shm.RingReader(ring, 0, max_message_size=max_message_size)
        channels._incoming[rank] = shm.ShmTransport(None, reader, max_message_size=max_message_size)


def _add_tcp(
    channels: EngineChannels,
    ranks: Collection[int],
    host: str,
    port: int,
    token: bytes | None,
    max_message_size: int,
    tls: tcp.TlsConfig | None = None,
) -> dict[str, Any]:
    """Listen for `ranks` on host:port; returns the address part they connect with (with the
    secrets a rank of this machine needs: see `with_tcp_secrets`)."""
    token = token or secrets.token_bytes(32)
    listener = tcp.TcpListener(
        token, host=host, port=port, max_message_size=max_message_size, tls=tls
    )
    channels._listener = listener
    channels._tcp_ranks = set(ranks)
    return _secrets_added(listener.address, token, tls)


_TCP_SECRETS = ("token", "tls_files")


def _secrets_added(
    part: dict[str, Any], token: bytes, tls: tcp.TlsConfig | None
) -> dict[str, Any]:
    out = {k: v for k, v in part.items() if k not in _TCP_SECRETS}
    out["token"] = token
    if tls is not None:
        out["tls_files"] = tls.absolute().to_dict()
    return out


def without_tcp_secrets(address: dict[str, Any]) -> dict[str, Any]:
    """The channel address without the token and TLS file paths (for a rank on another
    machine: its node agent adds its own, `with_tcp_secrets`). Other kinds pass unchanged."""
    if address.get("kind") == "tcp":
        return {k: v for k, v in address.items() if k not in _TCP_SECRETS}
    if address.get("kind") == "mixed":
        part = {k: v for k, v in address["tcp"].items() if k not in _TCP_SECRETS}
        return {**address, "tcp": part}
    return address


def with_tcp_secrets(
    address: dict[str, Any], token: bytes, tls: tcp.TlsConfig | None
) -> dict[str, Any]:
    """The channel address with this machine's token (and TLS files) for its tcp part: what a
    node agent hands the ranks it starts (their stdin), so the token never crosses the wire."""
    if address.get("kind") == "tcp":
        return _secrets_added(address, token, tls)
    if address.get("kind") == "mixed":
        return {**address, "tcp": _secrets_added(address["tcp"], token, tls)}
    return address


def _open_mixed(
    num_workers: int,
    remote: list[int],
    *,
    common_max: int,
    host: str,
    port: int,
    token: bytes | None,
    tls: tcp.TlsConfig | None,
) -> EngineChannels:
    local = [rank for rank in range(num_workers) if rank not in set(remote)]
    address: dict[str, Any] = {
        "kind": "mixed",
        "num_workers": num_workers,
        "max_message_size": common_max,
        "shm_ranks": local,
    }
    channels = EngineChannels("mixed", num_workers, address)
    try:
        _add_shm(channels, local, common_max)
        address["tcp"] = _add_tcp(channels, remote, host, port, token, common_max, tls)
    except BaseException:
        if channels._broadcast is not None:
            channels._broadcast.close()
        for link in channels._incoming.values():
            link.close()
        raise
    return channels


class WorkerChannels:
    """A worker's end, for a plain (non-async) loop or thread."""

    def __init__(
        self,
        rank: int,
        link: Transport,
        broadcast: shm.RingReader | None,
        shm_names: Collection[str] = (),
    ) -> None:
        self.rank = rank
        self._link = link  # sends to the engine (and, for inproc/tcp, receives too)
        self._broadcast = broadcast
        self._send_lock = threading.Lock()
        self._shm_names = list(shm_names)  # the engine's rings, by name (see unlink_shm_names)

    def unlink_shm_names(self) -> list[str]:
        """Unlink the engine's shared-memory names this worker knows: the broadcast ring and
        every shm rank's result ring (segments and semaphores). Only for a worker whose engine
        is gone: the engine created them and would unlink them on close, but a SIGKILLed one
        cannot. Mappings stay valid; names already gone are skipped. Idempotent (thread-safe:
        it only removes names). Returns the names it tried."""
        names, self._shm_names = self._shm_names, []
        unlink_names(names)
        return names

    def recv(self, timeout: float | None = None) -> Message:
        """The next broadcast or send_to(rank) message; TimeoutError after `timeout` s."""
        if self._broadcast is None:
            return decode(self._link.recv_frame_blocking(timeout))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            frame = memoryview(self._broadcast.read(remaining))
            target = int.from_bytes(frame[:_TARGET], "little")
            if target in (_TO_ALL, self.rank):
                return decode(frame[_TARGET:])

    def send(self, msg: Message) -> None:
        """Send `msg` to the engine (thread-safe)."""
        with self._send_lock:
            self._link.send_blocking(msg)

    def close(self) -> None:
        """Close this worker's end (idempotent); the engine's recv then fails."""
        with self._send_lock:
            self._link.close()
            if self._broadcast is not None:
                self._broadcast.close()


def connect_worker_channels(
    address: dict[str, Any], rank: int, timeout: float = 30.0
) -> WorkerChannels:
    """Attach rank `rank` to the engine's channels (blocking); sends Hello first."""
    kind, num_workers = address.get("kind"), int(address.get("num_workers", 0))
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank {rank} out of range for {num_workers} workers")
    broadcast: shm.RingReader | None = None
    link: Transport
    names: list[str] = []
    if kind == "inproc":
        ends = _inproc_registry.get(str(address.get("name")), {})
        if rank not in ends:
            raise TransportBroken(f"no inproc channel for rank {rank} (closed or taken)")
        link = ends.pop(rank)
    elif kind == "shm" or (kind == "mixed" and rank in address["shm_ranks"]):
        max_size = int(address["max_message_size"])
        index = address["shm_ranks"].index(rank) if kind == "mixed" else rank
        for ring_address in [address["broadcast"], *address["results"]]:
            names += ring_names(ring_address)
        broadcast = shm.RingReader(
            Ring.attach(address["broadcast"]), index, max_message_size=max_size
        )
        try:
            link = shm.ShmTransport(
                shm.RingWriter(Ring.attach(address["results"][index])),
                None,
                max_message_size=max_size,
            )
        except BaseException:
            broadcast.close()
            raise
    elif kind in ("mixed", "tcp"):
        link = _connect_tcp(address["tcp"] if kind == "mixed" else address, timeout)
    else:
        raise ValueError(f"unknown transport kind {kind!r} in channel address")
    channels = WorkerChannels(rank, link, broadcast, names)
    try:
        channels.send(Hello(rank=rank, world_size=num_workers, pid=os.getpid()))
    except BaseException:
        channels.close()
        raise
    return channels


def _connect_tcp(part: dict[str, Any], timeout: float) -> tcp.TcpTransport:
    """A rank's link to the engine's listener, with the token (and TLS files) its launcher
    put in the address."""
    files = part.get("tls_files")
    tls = tcp.TlsConfig.from_dict(files) if files else None
    return tcp.connect_blocking(part, part.get("token"), timeout, tls=tls)


__all__ = [
    "EngineChannels",
    "WorkerChannels",
    "connect_worker_channels",
    "open_engine_channels",
    "with_tcp_secrets",
    "without_tcp_secrets",
]
