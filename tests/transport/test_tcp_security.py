"""TCP refuses unauthenticated peers before decoding anything and keeps serving the rest."""

from __future__ import annotations

import logging
import socket

import anyio
import pytest

from conftest import TOKEN
from shardline.transport import tcp
from shardline.transport.errors import AuthenticationError, MessageTooLarge, TransportBroken
from shardline.transport.messages import Heartbeat


async def _serve_one_good_client(listener: tcp.TcpListener) -> None:
    async with anyio.create_task_group() as tg:
        accepted: list[tcp.TcpTransport] = []

        async def accept() -> None:
            accepted.append((await listener.accept_many(1))[0])

        tg.start_soon(accept)
        client = await tcp.connect(listener.address, TOKEN)
    server = accepted[0]
    await client.send(Heartbeat(1, 2))
    assert await server.recv() == Heartbeat(1, 2)
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("token", [b"wrong-token", None], ids=["wrong", "absent"])
async def test_bad_token_is_refused_and_server_keeps_serving(
    token: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shardline.transport.tcp")
    listener = tcp.TcpListener(TOKEN)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.accept_many, 1)
                with pytest.raises(AuthenticationError):
                    await tcp.connect(listener.address, token)
                tg.cancel_scope.cancel()
            assert "refused a client" in caplog.text
            await _serve_one_good_client(listener)
    finally:
        await listener.aclose()


def _raw_client(address: dict[str, object], payload: bytes) -> bytes:
    with socket.create_connection((str(address["host"]), int(address["port"])), timeout=10) as sock:
        greeting = sock.recv(64)
        sock.sendall(payload)
        try:
            return greeting + sock.recv(64)
        except OSError:
            return greeting


@pytest.mark.parametrize("payload", [b"GET / HTTP/1.1\r\n\r\n" * 5, b"\xff" * 64, b""])
async def test_garbage_and_silent_clients_are_dropped(
    payload: bytes, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="shardline.transport.tcp")
    monkeypatch.setattr(tcp, "HANDSHAKE_TIMEOUT", 0.5)
    listener = tcp.TcpListener(TOKEN)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.accept_many, 1)
                reply = await anyio.to_thread.run_sync(_raw_client, listener.address, payload)
                tg.cancel_scope.cancel()
            assert reply.startswith(tcp.MAGIC) and len(reply) == len(tcp.MAGIC) + tcp.NONCE_SIZE
            assert "tcp:" in caplog.text
            await _serve_one_good_client(listener)
    finally:
        await listener.aclose()


async def test_a_silent_client_does_not_block_a_good_one() -> None:
    listener = tcp.TcpListener(TOKEN)
    silent = socket.create_connection((listener.host, listener.port))
    try:
        with anyio.fail_after(tcp.HANDSHAKE_TIMEOUT - 1):
            await _serve_one_good_client(listener)
    finally:
        silent.close()
        await listener.aclose()


async def test_a_client_refuses_a_server_without_the_token() -> None:
    listener = tcp.TcpListener(b"another token")
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.accept_many, 1)
                with pytest.raises(AuthenticationError):
                    await tcp.connect(listener.address, TOKEN)
                tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


async def test_oversized_frame_header_from_the_peer_is_refused() -> None:
    listener = tcp.TcpListener(TOKEN, max_message_size=1024)
    try:
        async with anyio.create_task_group() as tg:
            accepted: list[tcp.TcpTransport] = []

            async def accept() -> None:
                accepted.append((await listener.accept_many(1))[0])

            tg.start_soon(accept)
            client = await tcp.connect(listener.address, TOKEN)
        client._sock.sendall((10**9).to_bytes(4, "big") + b"x" * 100)  # lies about its size
        with anyio.fail_after(10), pytest.raises(MessageTooLarge, match="1000000000"):
            await accepted[0].recv_frame()
        with pytest.raises(MessageTooLarge):  # the stream is desynchronised: stays refused
            await accepted[0].recv_frame()
        client.close()
        await accepted[0].aclose()
    finally:
        await listener.aclose()


def test_connect_to_nothing_is_transport_broken() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransportBroken):
        tcp.connect_blocking({"host": "127.0.0.1", "port": port}, TOKEN, timeout=2)


def test_listener_binds_loopback_by_default_and_needs_a_token() -> None:
    with pytest.raises(ValueError, match="token"):
        tcp.TcpListener(b"")
    listener = tcp.TcpListener(TOKEN)
    assert listener.host == "127.0.0.1"
    anyio.run(listener.aclose)
