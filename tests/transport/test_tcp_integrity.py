"""Every frame on an authenticated TCP link carries a sequence number and an HMAC-SHA256 tag
under the connection's session key: a changed, replayed, reordered, dropped, reflected or
transplanted frame, and a forged goodbye, are each refused as TransportBroken naming why."""

from __future__ import annotations

import anyio
import pytest

from conftest import TOKEN, make_pair
from shardline.transport import tcp
from shardline.transport.errors import TransportBroken, TransportClosed
from shardline.transport.messages import Heartbeat, encode
from support.relay import Relay

HANDSHAKE_UP = tcp.MAC_SIZE + tcp.NONCE_SIZE  # what a client sends before its first frame
HEADER = 12  # u32 length + u64 sequence number


async def _tcp_pair() -> tuple[tcp.TcpTransport, tcp.TcpTransport]:
    server, client = await make_pair("tcp")
    assert isinstance(server, tcp.TcpTransport) and isinstance(client, tcp.TcpTransport)
    return server, client


def _wire(transport: tcp.TcpTransport, frame: bytes) -> bytes:
    """The bytes `transport` would put on the wire for its next frame (it takes the next
    sequence number, as a real send would)."""
    return b"".join(bytes(view) for view in transport._frame_views(frame))


def _inject(client: tcp.TcpTransport, data: bytes) -> None:
    """Bytes into the client's socket as they would arrive from a man in the middle."""
    client._sock.setblocking(True)
    client._sock.sendall(data)
    client._sock.setblocking(False)


async def _recv_error(server: tcp.TcpTransport) -> TransportBroken:
    with anyio.fail_after(30), pytest.raises(TransportBroken) as caught:
        await server.recv_frame()
    with pytest.raises(TransportBroken):  # refused for good: the stream cannot be trusted
        await server.recv_frame()
    return caught.value


@pytest.mark.parametrize(
    "where, offset",
    [("payload", HEADER + 1), ("sequence number", 11), ("tag", -1)],
)
async def test_a_byte_changed_in_transit_is_refused(where: str, offset: int) -> None:
    """A relay between the ends flips one byte of the client's second frame."""
    listener = tcp.TcpListener(TOKEN)
    first = encode(Heartbeat(rank=1, seq=1))
    frame_size = HEADER + len(first) + tcp.TAG_SIZE
    target = HANDSHAKE_UP + frame_size + (offset if offset >= 0 else frame_size + offset)

    def flip(direction: str, start: int, data: bytes) -> bytes:
        if direction == "up" and start <= target < start + len(data):
            changed = bytearray(data)
            changed[target - start] ^= 0x01
            return bytes(changed)
        return data

    relay = Relay((listener.host, listener.port), tamper=flip)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                accepted: list[tcp.TcpTransport] = []

                async def accept() -> None:
                    accepted.extend(await listener.accept_many(1))

                tg.start_soon(accept)
                client = await tcp.connect({**listener.address, "port": relay.port}, TOKEN)
            server = accepted[0]
            await client.send(Heartbeat(rank=1, seq=1))
            await client.send(Heartbeat(rank=1, seq=2))
            assert await server.recv() == Heartbeat(rank=1, seq=1)
            error = await _recv_error(server)
        assert "frame 1 failed its integrity check" in str(error), error
        await client.aclose()
        await server.aclose()
    finally:
        relay.close()
        await listener.aclose()


async def test_a_replayed_frame_is_refused() -> None:
    server, client = await _tcp_pair()
    try:
        recorded = _wire(client, encode(Heartbeat(rank=0, seq=7)))
        _inject(client, recorded)
        assert await server.recv() == Heartbeat(rank=0, seq=7)
        _inject(client, recorded)  # the same bytes again
        error = await _recv_error(server)
        assert "replayed frame: sequence number 0 again (expected 1)" in str(error), error
    finally:
        await client.aclose()
        await server.aclose()


@pytest.mark.parametrize("order", ["swapped", "first dropped"])
async def test_reordered_or_dropped_frames_are_refused(order: str) -> None:
    server, client = await _tcp_pair()
    try:
        frame0 = _wire(client, encode(Heartbeat(rank=0, seq=0)))
        frame1 = _wire(client, encode(Heartbeat(rank=0, seq=1)))
        _inject(client, frame1 + frame0 if order == "swapped" else frame1)
        error = await _recv_error(server)
        assert "frame out of order: sequence number 1, expected 0" in str(error), error
    finally:
        await client.aclose()
        await server.aclose()


async def test_a_frame_reflected_back_to_its_sender_is_refused() -> None:
    """The server's own frame, sent back to it: the direction is part of the tag."""
    server, client = await _tcp_pair()
    try:
        _inject(client, _wire(server, encode(Heartbeat(rank=0, seq=0))))
        error = await _recv_error(server)
        assert "failed its integrity check" in str(error), error
    finally:
        await client.aclose()
        await server.aclose()


async def test_a_frame_of_another_connection_is_refused() -> None:
    """Same token, same sequence number, another connection: another session key."""
    server_a, client_a = await _tcp_pair()
    server_b, client_b = await _tcp_pair()
    try:
        _inject(client_b, _wire(client_a, encode(Heartbeat(rank=0, seq=0))))
        error = await _recv_error(server_b)
        assert "failed its integrity check" in str(error), error
    finally:
        for end in (client_a, server_a, client_b, server_b):
            await end.aclose()


async def test_a_forged_goodbye_is_refused_and_a_real_one_closes() -> None:
    server, client = await _tcp_pair()
    try:
        forged = tcp.GOODBYE.to_bytes(4, "big") + (0).to_bytes(8, "big") + bytes(tcp.TAG_SIZE)
        _inject(client, forged)
        error = await _recv_error(server)
        assert "failed its integrity check" in str(error), error
    finally:
        await client.aclose()
        await server.aclose()
    server, client = await _tcp_pair()
    await client.send(Heartbeat(rank=0, seq=0))
    client.close()
    assert await server.recv() == Heartbeat(rank=0, seq=0)
    with anyio.fail_after(30), pytest.raises(TransportClosed):
        await server.recv()
    await server.aclose()


async def test_the_blocking_receiver_refuses_too() -> None:
    server, client = await _tcp_pair()
    try:
        recorded = _wire(client, encode(Heartbeat(rank=0, seq=0)))
        _inject(client, recorded + recorded)
        assert server.recv_blocking(timeout=30) == Heartbeat(rank=0, seq=0)
        with pytest.raises(TransportBroken, match="replayed frame"):
            server.recv_blocking(timeout=30)
    finally:
        await client.aclose()
        await server.aclose()


async def test_concurrent_async_senders_send_whole_frames_in_sequence_order() -> None:
    """Large frames from several tasks at once (each send waits for the socket): every frame
    arrives whole and its sequence number in order, none refused."""
    server, client = await _tcp_pair()
    payloads = [bytes([i]) * (1 << 20) for i in range(24)]
    received: list[bytes] = []
    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    for _ in payloads:
                        received.append(bytes(await server.recv_frame()))

                tg.start_soon(receive)
                async with anyio.create_task_group() as senders:
                    for payload in payloads:
                        senders.start_soon(client.send_frame, payload)
        assert sorted(received) == sorted(payloads)
    finally:
        await client.aclose()
        await server.aclose()
