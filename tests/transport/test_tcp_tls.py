"""Mutual TLS on tcp links: frames flow encrypted (a relay sees none of their bytes), large
frames and the blocking API work, and a peer without a certificate of the CA is refused while
the listener keeps serving good ones."""

from __future__ import annotations

import logging
import pathlib
import socket

import anyio
import pytest

from conftest import TOKEN
from shardline.transport import tcp
from shardline.transport.errors import AuthenticationError
from shardline.transport.messages import Heartbeat
from support.certs import CertificateAuthority, make_ca
from support.relay import Relay

MARKER = b"plain-text-marker-" * 4


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_ca(tmp_path_factory.mktemp("other-ca"), "other-ca")


async def _connect_pair(
    listener: tcp.TcpListener, tls: tcp.TlsConfig | None, port: int | None = None
) -> tuple[tcp.TcpTransport, tcp.TcpTransport]:
    accepted: list[tcp.TcpTransport] = []

    async def accept() -> None:
        accepted.extend(await listener.accept_many(1))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept)
            address = {**listener.address, "port": port or listener.port}
            client = await tcp.connect(address, TOKEN, tls=tls)
    return accepted[0], client


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain (control)"])
async def test_frames_cross_encrypted_with_tls(ca: CertificateAuthority, use_tls: bool) -> None:
    server_tls, client_tls = (ca.leaf("server"), ca.leaf("client")) if use_tls else (None, None)
    listener = tcp.TcpListener(TOKEN, tls=server_tls)
    relay = Relay((listener.host, listener.port))
    try:
        assert listener.address.get("tls", False) is use_tls
        server, client = await _connect_pair(listener, client_tls, relay.port)
        assert server.tls is use_tls and client.tls is use_tls
        big = MARKER + bytes(range(256)) * (32 << 10)  # 8 MiB: many TLS records, partial writes
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send_frame, big)
                assert bytes(await server.recv_frame()) == big
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.send_frame, big)
                got = await anyio.to_thread.run_sync(client.recv_frame_blocking, 30)
                assert bytes(got) == big
            for seq in range(50):
                await anyio.to_thread.run_sync(client.send_blocking, Heartbeat(rank=2, seq=seq))
                assert await server.recv() == Heartbeat(rank=2, seq=seq)
        await client.aclose()
        await server.aclose()
        seen = relay.bytes("up") + relay.bytes("down")
        assert len(seen) > 2 * len(big)
        assert (MARKER in seen) is not use_tls  # with TLS the relay saw ciphertext only
        assert (tcp.MAGIC in seen) is not use_tls
    finally:
        relay.close()
        await listener.aclose()


def _plain_client(address: dict[str, object]) -> None:
    """A client that skips TLS and starts the token handshake in the clear."""
    with socket.create_connection((str(address["host"]), int(address["port"])), timeout=10) as s:
        tcp.client_handshake(s, TOKEN, 10)


async def test_peers_without_a_certificate_of_the_ca_are_refused(
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shardline.transport.tcp")
    listener = tcp.TcpListener(TOKEN, tls=ca.leaf("server"))
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.accept_many, 1)
                with pytest.raises(AuthenticationError, match="requires TLS"):
                    await tcp.connect(listener.address, TOKEN)  # no certificate at all
                with pytest.raises(AuthenticationError):  # ignores TLS, speaks in the clear
                    await anyio.to_thread.run_sync(_plain_client, listener.address)
                with pytest.raises(AuthenticationError):  # a certificate of another CA
                    await tcp.connect(listener.address, TOKEN, tls=other_ca.leaf("intruder"))
                tg.cancel_scope.cancel()
            assert caplog.text.count("tcp: dropped a client") >= 2, caplog.text
            server, client = await _connect_pair(listener, ca.leaf("client"))  # still serving
            await client.send(Heartbeat(rank=0, seq=0))
            assert await server.recv() == Heartbeat(rank=0, seq=0)
            await client.aclose()
            await server.aclose()
    finally:
        await listener.aclose()


async def test_a_client_refuses_a_server_of_another_ca(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    listener = tcp.TcpListener(TOKEN, tls=other_ca.leaf("impostor"))
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.accept_many, 1)
                with pytest.raises(AuthenticationError, match="TLS handshake failed"):
                    await tcp.connect(listener.address, TOKEN, tls=ca.leaf("client"))
                tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


def test_tls_files_that_do_not_load_are_named(tmp_path: pathlib.Path) -> None:
    missing = tcp.TlsConfig(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), str(tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match="cannot load TLS files"):
        missing.server_context()
