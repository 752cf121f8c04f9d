"""Hostile peers on the head's node port during start-up: one that announces itself as node 1
and then presents a wrong token, says nothing, or sends garbage is logged and dropped, and the
real node still joins (the start is not failed by it). A real node with a wrong token makes the
start fail at its deadline, naming the node and the wrong token."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import pathlib
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from multinode.nodes import Agents, two_nodes
from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.remote import NODE_MAGIC, NodeServer, connect_to_head
from shardline.transport import tcp
from shardline.transport.errors import AuthenticationError
from shardline.transport.messages import Hello, InitWorker, decode
from support.certs import make_ca
from support.waiting import wait_until

TOKEN = b"the-real-token-0123456789"
ROGUES = ["wrong token", "garbage proof", "silence", "early close"]
CONFIG = {"rank": 1, "marker": "node-1-config"}


def _rogue(host: str, port: int, behaviour: str, deadline_s: float = 60.0) -> None:
    """Connect (retrying until the head listens), announce node 1, misbehave, and wait for
    the head to hang up."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=30)
            break
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
    with sock:
        sock.sendall(NODE_MAGIC + (1).to_bytes(4, "big"))
        if behaviour == "early close":
            return
        if behaviour != "silence":
            challenge = b""
            while len(challenge) < len(tcp.MAGIC) + tcp.NONCE_SIZE:
                chunk = sock.recv(64)
                assert chunk, "the head hung up before challenging us"
                challenge += chunk
            nonce = challenge[len(tcp.MAGIC) :]
            if behaviour == "wrong token":
                proof = hmac.new(b"a guessed token", b"client" + nonce, hashlib.sha256).digest()
            else:
                proof = os.urandom(tcp.MAC_SIZE)
            sock.sendall(proof + os.urandom(tcp.NONCE_SIZE))
        while sock.recv(4096):  # until the head drops us
            pass


def _real_agent(
    address: str, token: bytes, tls: tcp.TlsConfig | None = None
) -> tuple[dict[str, Any], tcp.TcpTransport]:
    """What an agent does up to its first InitWorker (blocking): that config, and the link
    (the head counts the node as gone once it is closed)."""
    link = connect_to_head(address, token, 1, tls=tls)
    try:
        link.send_blocking(Hello(rank=1, world_size=1, pid=os.getpid()))
        msg = decode(link.recv_frame_blocking(30))
        assert isinstance(msg, InitWorker), msg
    except BaseException:
        link.close()
        raise
    return msg.config, link


async def _join(head: Head, tls: tcp.TlsConfig | None = None) -> dict[str, Any]:
    """The real node joins: its config, checked while its link is up."""
    config, link = await anyio.to_thread.run_sync(_real_agent, head.server.address, TOKEN, tls)
    try:
        assert head.server.missing() == []
        assert head.failures == []
    finally:
        link.close()
    return config


class Head:
    """A NodeServer waiting for node 1, as the head's executor runs it; failures recorded."""

    def __init__(self, tls: tcp.TlsConfig | None = None) -> None:
        self.failures: list[str] = []
        self.server = NodeServer(
            {1: [1]}, TOKEN, lambda rank, reason: self.failures.append(reason), tls
        )
        self.server.listen("127.0.0.1", 0)
        self.host, port = self.server.address.rsplit(":", 1)
        self.port = int(port)


@contextlib.asynccontextmanager
async def running_head(tls: tcp.TlsConfig | None = None) -> AsyncIterator[Head]:
    head = Head(tls)
    async with anyio.create_task_group() as tg:
        tg.start_soon(head.server.serve, {1: [CONFIG]})
        try:
            yield head
        finally:
            await head.server.aclose(stop_agents=False, grace=1.0)
            tg.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def _short_handshakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "HANDSHAKE_TIMEOUT", 2.0)  # the silent rogue is dropped sooner


@pytest.mark.parametrize("behaviour", ROGUES)
async def test_a_rogue_node_is_dropped_and_the_real_node_joins(
    behaviour: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shardline.remote")
    async with running_head() as head:
        with anyio.fail_after(60):
            await anyio.to_thread.run_sync(_rogue, head.host, head.port, behaviour)
            await wait_until(lambda: bool(head.server.refusals(1)), deadline_s=30)
            assert head.failures == []  # the start goes on
            assert head.server.missing() == [1]
            assert await _join(head) == CONFIG
    refusal = head.server.refusals(1)[0]
    assert "claiming to be node 1" in refusal and "failed authentication" in refusal, refusal
    if behaviour in ("wrong token", "garbage proof"):
        assert "wrong token" in refusal, refusal
    assert "still waiting for the real one" in caplog.text


async def test_all_rogues_at_once_then_the_real_node() -> None:
    async with running_head() as head:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for behaviour in ROGUES * 2:
                    tg.start_soon(anyio.to_thread.run_sync, _rogue, head.host, head.port, behaviour)
            await wait_until(lambda: len(head.server.refusals(1)) == len(ROGUES) * 2)
            assert await _join(head) == CONFIG


async def test_the_deadline_report_names_the_node_and_the_wrong_token() -> None:
    async with running_head() as head:
        with anyio.fail_after(60):
            with pytest.raises(AuthenticationError):
                await anyio.to_thread.run_sync(_real_agent, head.server.address, b"a wrong token")
            await wait_until(lambda: bool(head.server.refusals(1)), deadline_s=30)
        report = head.server.missing_report(8.0)
        assert head.failures == []
    assert report.startswith(f"node(s) [1] (ranks [1]) did not connect to {head.server.address}")
    assert "node 1 failed authentication: it presented a wrong token" in report, report
    assert "a peer presented a wrong token" in report, report


async def test_tls_on_the_node_port(tmp_path: pathlib.Path) -> None:
    """With TLS, a plain agent and one with another CA's certificate are refused (and told so);
    one with a certificate of the head's CA joins."""
    ca, other = make_ca(tmp_path / "ca"), make_ca(tmp_path / "other", "other-ca")
    async with running_head(tls=ca.leaf("head")) as head:
        with anyio.fail_after(60):
            for tls in (None, other.leaf("intruder")):
                with pytest.raises(AuthenticationError):
                    await anyio.to_thread.run_sync(_real_agent, head.server.address, TOKEN, tls)
            await wait_until(lambda: len(head.server.refusals(None)) == 2, deadline_s=30)
            assert all("TLS handshake" in r for r in head.server.refusals(None))
            assert await _join(head, ca.leaf("node1")) == CONFIG


# ---------------------------------------------------------------------- a whole engine


async def test_rogues_during_engine_start_do_not_stop_the_real_node(
    tiny_llama_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Engine.start with nodes=2: rogues claiming node 1 come first (wrong token, garbage,
    silence); the start goes on, the real agent joins, and the engine generates."""
    caplog.set_level(logging.WARNING, logger="shardline.remote")
    token = secrets.token_hex(16)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with two_nodes("loopback") as topology:
        agents = Agents(topology, tmp_path)
        config = EngineConfig(
            model=str(tiny_llama_dir), max_model_len=128, num_kv_blocks=32, block_size=4,
            tensor_parallel_size=2, nodes=2, head_host=topology.head_host,
            head_port=topology.free_port(), tcp_token=token, worker_start_timeout=120.0,
        )  # fmt: skip
        started: list[Engine] = []
        try:
            with anyio.fail_after(240):
                async with anyio.create_task_group() as tg:

                    async def start() -> None:
                        started.append(await Engine.start(config))

                    tg.start_soon(start)
                    async with anyio.create_task_group() as rogues:
                        for behaviour in ["wrong token", "garbage proof", "silence"]:
                            rogues.start_soon(
                                anyio.to_thread.run_sync,
                                _rogue, topology.head_host, config.head_port, behaviour,
                            )  # fmt: skip
                    assert caplog.text.count("claiming to be node 1") == 3, caplog.text
                    agents.start(f"{topology.head_host}:{config.head_port}", token, 1)
                (engine,) = started
                async with engine:
                    out = [o async for o in engine.generate("hello", params)]
                    assert len(out[-1].token_ids) == params.max_tokens
        finally:
            agents.stop()
