"""Fixtures for the transport tests: a connected pair of ends for every kind of transport."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

# Spawned peer processes import their entry points from `transport_peers` by module name.
sys.path.insert(0, str(Path(__file__).parent))

from shardline.transport import inproc, shm, tcp  # noqa: E402
from shardline.transport.base import Transport  # noqa: E402

KINDS = ["inproc", "shm", "tcp"]
SHM_SLOT_SIZE = 64 << 10
TOKEN = b"test-token-0123456789"


async def make_pair(kind: str, max_message_size: int = 256 << 20) -> tuple[Transport, Transport]:
    """Two connected ends of one link, both usable from this event loop."""
    if kind == "inproc":
        return inproc.pipe(max_message_size=max_message_size)
    if kind == "shm":
        ours, address = shm.create_link(
            nslots=8, slot_size=SHM_SLOT_SIZE, max_message_size=max_message_size
        )
        return ours, shm.connect(address)
    listener = tcp.TcpListener(TOKEN, max_message_size=max_message_size)
    try:
        accepted: list[Transport] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        async with anyio.create_task_group() as tg:
            tg.start_soon(accept)
            client = await tcp.connect(listener.address, TOKEN)
    finally:
        await listener.aclose()
    return accepted[0], client


@pytest.fixture(params=KINDS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Transport, Transport]]:
    """A connected (a, b) pair of the parametrized kind, closed afterwards."""
    a, b = await make_pair(request.param)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()
