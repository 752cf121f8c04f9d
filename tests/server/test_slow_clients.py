"""Slow and idle clients (issue 20 item 5): header and body read timeouts, a connection cap.

The server is the serve command's own uvicorn set-up (`launch.uvicorn_config`, with its h11
protocol from `http_limits`) around the fake engine, with 1-second timeouts. Fifty
connections that are idle, trickle their headers a byte at a time, or stall halfway through
their body are each closed by the server within the timeout plus slack, with a 408 where a
request had begun, while a well-behaved client keeps being answered.
"""

from __future__ import annotations

import json
import pathlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import pytest
import uvicorn
from anyio.abc import SocketStream

from server.conftest import MODEL
from server.fake_engine import FakeEngine, expected_text
from server.helpers import running_uvicorn
from server.process import fake_serve_command, server_process
from shardline.engine import cli
from shardline.engine.server import build_app
from shardline.engine.server.launch import ServeOptions, uvicorn_config

TIMEOUT_S = 1.0
SLACK_S = 4.0  # a loaded CI machine: the server may be late, never this late
GOOD = {"prompt": "hello", "max_tokens": 5}
REQUEST_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@dataclass
class Served:
    base_url: str
    port: int
    server: uvicorn.Server

    @property
    def open_connections(self) -> int:
        return len(self.server.server_state.connections)


@asynccontextmanager
async def serving(*, header_timeout_s: float = TIMEOUT_S, body_timeout_s: float = TIMEOUT_S,
                  max_connections: int = 1024, engine: FakeEngine | None = None) -> AsyncIterator[Served]:
    app = build_app(engine or FakeEngine(max_model_len=256), served_model_name=MODEL, api_key=None,
                    body_timeout_s=body_timeout_s)
    options = ServeOptions(host="127.0.0.1", port=0, header_timeout_s=header_timeout_s,
                           body_timeout_s=body_timeout_s, max_connections=max_connections, log_level="warning")
    async with running_uvicorn(uvicorn_config(app, options, lifespan="off")) as (server, port):
        yield Served(f"http://127.0.0.1:{port}", port, server)


async def read_until_closed(stream: SocketStream, *, pace: bytes = b"", every_s: float = 0.25) -> bytes:
    """Everything the server sends until it closes the connection; meanwhile send `pace` a
    byte at a time, one byte every `every_s`."""
    reply = b""
    sent = 0
    while True:
        with anyio.move_on_after(every_s if sent < len(pace) else 60):
            try:
                chunk = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return reply
            reply += chunk
            continue
        if sent < len(pace):
            try:
                await stream.send(pace[sent:sent + 1])
            except (anyio.BrokenResourceError, OSError):
                pass  # closed meanwhile: the next receive says so
            sent += 1


def status_of(reply: bytes) -> str:
    return reply.split(b"\r\n", 1)[0].decode("latin-1")


def error_code_of(reply: bytes) -> str:
    return str(json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"])


async def test_slow_and_idle_connections_are_closed_while_others_are_served() -> None:
    results: dict[str, list[tuple[float, bytes]]] = {"idle": [], "slow-headers": [], "stalled-body": []}
    good_latencies: list[float] = []
    async with serving() as served:

        async def slow_client(kind: str) -> None:
            async with await anyio.connect_tcp("127.0.0.1", served.port) as stream:
                started = time.monotonic()
                if kind == "idle":
                    reply = await read_until_closed(stream)
                elif kind == "slow-headers":
                    reply = await read_until_closed(stream, pace=REQUEST_HEAD + b"Content-Length: 40\r\n\r\n")
                else:
                    await stream.send(REQUEST_HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "')
                    reply = await read_until_closed(stream)
                results[kind].append((time.monotonic() - started, reply))

        async def good_client(stop: anyio.Event) -> None:
            async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    response = await client.post("/v1/completions", json=GOOD)
                    assert response.status_code == 200, response.text
                    assert response.json()["choices"][0]["text"] == expected_text(5)
                    assert (await client.get("/health")).status_code == 200
                    good_latencies.append(time.monotonic() - started)
                    await anyio.sleep(0.05)

        stop = anyio.Event()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(good_client, stop)
                async with anyio.create_task_group() as slow:
                    for i in range(50):
                        slow.start_soon(slow_client, ("idle", "slow-headers", "stalled-body")[i % 3])
                stop.set()
        # Every slow connection is gone from the server's books, and it still serves.
        with anyio.fail_after(10):
            while served.open_connections > 0:  # noqa: ASYNC110 - uvicorn keeps a set, not an event
                await anyio.sleep(0.05)
        async with httpx.AsyncClient(base_url=served.base_url) as client:
            assert (await client.post("/v1/completions", json=GOOD)).status_code == 200

    assert sum(len(r) for r in results.values()) == 50
    for kind, closed in results.items():
        for seconds, reply in closed:
            assert TIMEOUT_S * 0.9 <= seconds <= TIMEOUT_S + SLACK_S, (kind, seconds, reply[:200])
            if kind == "idle":  # nothing was asked: closed without a word
                assert reply == b"", reply[:200]
            else:
                assert status_of(reply) == "HTTP/1.1 408 Request Timeout", reply[:300]
                assert error_code_of(reply) == "request_timeout"
    assert len(good_latencies) >= 3, good_latencies  # served all along (the slow ones took >= 1 s)


async def test_a_kept_alive_connection_gets_the_header_timeout_again() -> None:
    async with serving() as served, await anyio.connect_tcp("127.0.0.1", served.port) as stream:
        body = json.dumps(GOOD).encode()
        request = REQUEST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
        for pause in (TIMEOUT_S / 2, TIMEOUT_S / 2, 0):  # prompt requests on one connection are served
            await stream.send(request)
            with anyio.fail_after(10):
                reply = await stream.receive()
            answered = time.monotonic()
            assert status_of(reply) == "HTTP/1.1 200 OK"
            await anyio.sleep(pause)
        # The next one trickles in: the clock started when the last answer went out.
        with anyio.fail_after(30):
            reply = await read_until_closed(stream, pace=request)
        assert TIMEOUT_S * 0.9 <= time.monotonic() - answered <= TIMEOUT_S + SLACK_S
        assert status_of(reply) == "HTTP/1.1 408 Request Timeout", reply[:300]


async def test_a_request_that_is_on_time_is_not_cut_short() -> None:
    """The deadlines cover reading the request, not answering it: an answer that takes three
    times the timeouts streams to its end."""
    async with serving(engine=FakeEngine(max_model_len=256, token_delay=0.1)) as served:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as client:
            body = {"prompt": "hello", "max_tokens": 30, "stream": True}
            started = time.monotonic()
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                text = (await response.aread()).decode()
            assert time.monotonic() - started > 3 * TIMEOUT_S
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
            assert '"finish_reason":"length"' in text, text[-400:]


async def test_connections_over_the_cap_get_503_until_one_closes() -> None:
    cap = 8
    async with serving(header_timeout_s=60, max_connections=cap) as served:
        idle = [await anyio.connect_tcp("127.0.0.1", served.port) for _ in range(cap)]
        try:
            with anyio.fail_after(10):
                while served.open_connections < cap:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            for _ in range(3):
                async with await anyio.connect_tcp("127.0.0.1", served.port) as extra:
                    with anyio.fail_after(10):
                        reply = await read_until_closed(extra)
                assert status_of(reply) == "HTTP/1.1 503 Service Unavailable", reply[:300]
                assert error_code_of(reply) == "too_many_connections"
            assert served.open_connections == cap  # the refused ones were never counted
            await idle.pop().aclose()
            with anyio.fail_after(10):
                while served.open_connections >= cap:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            async with httpx.AsyncClient(base_url=served.base_url) as client:
                response = await client.post("/v1/completions", json=GOOD)
                assert response.status_code == 200, response.text
        finally:
            for stream in idle:
                await stream.aclose()


@pytest.mark.parametrize(("header_timeout_s", "max_connections"), [(0, 10), (-1, 10), (1, 0)])
def test_settings_out_of_range_are_refused(header_timeout_s: float, max_connections: int) -> None:
    options = ServeOptions(header_timeout_s=header_timeout_s, max_connections=max_connections)
    app = build_app(FakeEngine(), served_model_name=MODEL, api_key=None)
    with pytest.raises(ValueError):
        uvicorn_config(app, options)
    with pytest.raises(ValueError):
        build_app(FakeEngine(), served_model_name=MODEL, api_key=None, body_timeout_s=0)


def test_serve_flags_set_the_limits(tmp_path: pathlib.Path) -> None:
    """`shardline serve --http-header-timeout --http-body-timeout --max-connections` (with the
    fake engine): the settings reach the server."""
    flags = ("--http-header-timeout", "1", "--http-body-timeout", "1", "--max-connections", "2")
    with server_process(fake_serve_command(*flags), tmp_path) as server:
        server.wait_healthy(60)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as idle, \
                socket.create_connection(("127.0.0.1", server.port), timeout=30) as stalled:
            stalled.sendall(REQUEST_HEAD + b"Content-Length: 100\r\n\r\n{")
            time.sleep(0.3)  # both are the server's before the third knocks
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as third:
                assert status_of(_read_all(third)) == "HTTP/1.1 503 Service Unavailable"
            started = time.monotonic()
            assert _read_all(idle) == b""
            assert status_of(_read_all(stalled)) == "HTTP/1.1 408 Request Timeout"
            assert time.monotonic() - started <= TIMEOUT_S + SLACK_S
        response = httpx.post(server.base_url + "/v1/completions", json=GOOD, timeout=30)
        assert response.status_code == 200, response.text


def _read_all(sock: socket.socket) -> bytes:
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    return reply


@pytest.mark.parametrize("flag", [("--http-header-timeout", "0"), ("--http-body-timeout", "-1"),
                                  ("--http-body-timeout", "inf"), ("--max-connections", "0")])
def test_serve_refuses_limits_out_of_range(flag: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *flag])
    assert exit_info.value.code == 2
    assert flag[0] in capsys.readouterr().err
