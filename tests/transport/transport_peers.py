"""Entry points of peer processes spawned by the transport tests (importable by name)."""

from __future__ import annotations

import time
from typing import Any

from shardline.transport import TransportError, connect_worker_channels, shm, tcp
from shardline.transport.messages import Heartbeat, Shutdown, WorkerError
from shardline.transport.shm_ring import Ring


def echo_link(kind: str, address: dict[str, Any], token: bytes | None = None) -> None:
    """Connect to a link and echo every frame back until the link closes."""
    link = shm.connect(address) if kind == "shm" else tcp.connect_blocking(address, token)
    try:
        while True:
            link.send_frame_blocking(link.recv_frame_blocking(60))
    except TransportError:
        pass
    finally:
        link.close()


def connect_and_sleep(kind: str, address: dict[str, Any], token: bytes | None = None) -> None:
    """Connect, say one frame, then sleep until killed."""
    link = shm.connect(address) if kind == "shm" else tcp.connect_blocking(address, token)
    link.send_frame_blocking(b"ready")
    time.sleep(600)


def create_ring_and_sleep(queue: Any) -> None:
    """Create a ring, report its name, then sleep until killed (leaves names behind)."""
    ring = Ring.create(2, 64, 1)
    queue.put(ring.base)
    time.sleep(600)


def echo_worker(address: dict[str, Any], rank: int) -> None:
    """A channel worker: echo every message back as-is until Shutdown, then exit."""
    channels = connect_worker_channels(address, rank, timeout=30)
    try:
        while True:
            msg = channels.recv(timeout=60)
            if isinstance(msg, Shutdown):
                break
            channels.send(msg)
    except TransportError as exc:
        try:
            channels.send(WorkerError(rank, type(exc).__name__, str(exc), ""))
        except TransportError:
            pass
    finally:
        channels.close()


def heartbeat_then_sleep(address: dict[str, Any], rank: int) -> None:
    """A channel worker that sends one heartbeat and then hangs (to be killed)."""
    channels = connect_worker_channels(address, rank, timeout=30)
    channels.send(Heartbeat(rank, 0))
    time.sleep(600)
