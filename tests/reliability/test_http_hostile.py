"""Hostile input: each gets a specific error (never a 500, never a hang) while a well-behaved
client keeps getting the same greedy answers, and the engine keeps serving.

One `shardline serve --transport tcp` serves the whole module. While it starts, garbage is
thrown at its engine<->worker TCP listener (the only moment that port is open: it closes once
every worker has authenticated); afterwards the HTTP endpoints get random and malformed JSON,
huge bodies, invalid UTF-8, prompts of only special tokens and absurd parameters.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from reliability.http_support import (
    MAX_MODEL_LEN,
    STARTUP_DEADLINE_S,
    GoodClient,
    assert_no_server_errors,
    listening_ports,
    reference_text,
    stop_cleanly,
    wait_idle,
)
from server.e2e_support import shardline_executable
from server.process import ServerProcess, server_process
from shardline.transport import tcp

MAX_BODY = 64 * 1024
JSON = {"content-type": "application/json"}
MAGIC_LEN = len(tcp.MAGIC) + tcp.NONCE_SIZE  # the server's greeting: magic + its nonce (transport.tcp)
# Descriptors the server may hold after the module beyond what it held once it had answered
# its first request: lazily opened ones (e.g. a worker thread's), never one per request.
FD_GROWTH_ALLOWED = 8
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SPECIAL_IDS = (256, 257, 258)  # their ids in the tiny tokenizer (bytes are 0..255)


@dataclass
class TransportAttack:
    """What each garbage connection to the transport listener saw."""

    port: int | None = None
    results: dict[str, tuple[bool, bool, float]] = field(default_factory=dict)  # got magic, closed, seconds


def _garbage_cases() -> dict[str, bytes]:
    rng = random.Random(3)
    return {
        "random-bytes": rng.randbytes(4096),
        "oversized-frame-header": b"\xff\xff\xff\xf0" + rng.randbytes(100),
        "truncated-frame": (1000).to_bytes(4, "big") + b"\x93\x01",
        "http-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4,
        "flood": rng.randbytes(1 << 20),
        "nothing": b"",
    }


def _attack_one(port: int, payload: bytes, out: dict[str, tuple[bool, bool, float]], name: str) -> None:
    started = time.monotonic()
    got = b""
    closed = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            try:
                sock.sendall(payload)
            except OSError:
                pass  # the server may hang up before taking it all
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    closed = True
                    break
                got += chunk
    except ConnectionRefusedError:
        out[name] = (False, False, 0.0)  # the listener was already gone
        return
    except OSError:
        closed = True  # reset by the server: also a drop
    out[name] = (got.startswith(tcp.MAGIC) and len(got) == MAGIC_LEN, closed, time.monotonic() - started)


def _attack_transport_port(server: ServerProcess, attack: TransportAttack) -> None:
    """Find the engine's transport listener while the server starts; throw garbage at it."""
    end = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < end and server.proc.poll() is None:
        ports = listening_ports(server.proc.pid) - {server.port}
        if ports:
            attack.port = min(ports)
            break
        time.sleep(0.01)
    if attack.port is None:
        return
    threads = [threading.Thread(target=_attack_one, args=(attack.port, payload, attack.results, name))
               for name, payload in _garbage_cases().items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)


@dataclass
class Hostile:
    server: ServerProcess
    attack: TransportAttack
    expected: str
    fds_before: int  # the server's open descriptors once it had answered the reference


def open_fds(pid: int) -> int:
    """How many descriptors the process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """The process's open descriptors by kind (socket, pipe, anon_inode:..., or the path)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":[")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.fixture(scope="module")
def hostile(tiny_llama_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    command = [shardline_executable(), "serve", "--model", str(tiny_llama_dir), "--transport", "tcp",
               "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY), "--max-num-seqs", "32"]
    with server_process(command, tmp_path_factory.mktemp("hostile")) as server:
        attack = TransportAttack()
        _attack_transport_port(server, attack)
        server.wait_healthy(STARTUP_DEADLINE_S)
        expected = anyio.run(_reference, server.base_url)
        anyio.run(wait_idle, server.base_url)
        yield Hostile(server, attack, expected, open_fds(server.proc.pid))
        stop_cleanly(server)
        assert_no_server_errors(server.log())


async def _reference(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return await reference_text(client)


@asynccontextmanager
async def beside_good_client(h: Hostile) -> AsyncIterator[httpx.AsyncClient]:
    """A hostile client, with a well-behaved one running the whole time; checks both after."""
    good = GoodClient(h.server.base_url, h.expected)
    async with anyio.create_task_group() as tg:
        tg.start_soon(good.run)
        async with httpx.AsyncClient(base_url=h.server.base_url, timeout=60) as client:
            with anyio.fail_after(120):  # nothing hostile may hang the test
                yield client
        with anyio.fail_after(60):  # let it finish a few answers even after a quick test
            while good.answered < 3 and not good.problems:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        good.stop.set()
    good.check(at_least=3)
    await wait_idle(h.server.base_url)


def assert_error(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    """A specific 4xx in OpenAI's error shape (never a 500)."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error  # type: ignore[no-any-return]


# ----------------------------------------------------------------------- the transport port


def test_transport_port_garbage_is_dropped_and_the_port_closes(hostile: Hostile) -> None:
    attack = hostile.attack
    assert attack.port is not None, "never saw the engine's transport listener"
    reached = {name: r for name, r in attack.results.items() if r[0]}
    assert reached, f"no garbage connection reached the listener: {attack.results}"
    for name, (_, closed, seconds) in reached.items():
        assert closed, f"{name}: the server kept a garbage connection open"
        assert seconds < 10, f"{name}: dropped only after {seconds:.1f} s"
    assert "tcp: refused a client" in hostile.server.log() or "tcp: dropped a client" in hostile.server.log()
    # Once the workers are in, the listener is closed: there is nothing left to attack.
    assert listening_ports(hostile.server.proc.pid) == {hostile.server.port}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", attack.port), timeout=5).close()


# ----------------------------------------------------------------------- HTTP


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**64), 10**30, rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.0, -0.5, 1e308, -1e-308, 3.5, rng.uniform(-10, 10)])
    if kind == "str":
        return rng.choice(["", "x", "\u0000", "\ud800", "<|im_end|>", "é" * 50, "a" * rng.randint(0, 3000)])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["prompt", "messages", "model", "max_tokens", "stream", "temperature", "role", "content",
            "stop", "logprobs", "top_logprobs", "seed", "n", "stream_options", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def _mutated_request(rng: random.Random, chat: bool) -> Any:
    """A valid request with one field replaced by a random value (or dropped)."""
    body: dict[str, Any] = {"max_tokens": 3, "temperature": 0, "stream": rng.random() < 0.3}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hello"
    key = rng.choice([*body, "messages" if not chat else "prompt", "model", "stop", "seed", "logprobs", "n"])
    if rng.random() < 0.2:
        body.pop(key, None)
    else:
        body[key] = _random_json(rng)
    return body


def _random_body(rng: random.Random, chat: bool) -> bytes:
    roll = rng.random()
    if roll < 0.4:
        return json.dumps(_mutated_request(rng, chat)).encode()
    if roll < 0.6:
        return json.dumps(_random_json(rng)).encode()
    if roll < 0.75:  # valid JSON cut short
        text = json.dumps(_mutated_request(rng, chat)).encode()
        return text[: rng.randint(0, len(text))]
    if roll < 0.85:
        return rng.randbytes(rng.randint(0, 200))
    return rng.choice([b"{", b"[]", b"null", b'{"prompt": NaN}', b'{"prompt": "a", "prompt": 1}',
                       b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}', b"\x00" * 10])


def _cap(body: bytes) -> bytes:
    """Keep generation short on requests that happen to be valid (CPU decoding is slow)."""
    try:
        value = json.loads(body)
    except ValueError:
        return body
    if isinstance(value, dict) and isinstance(value.get("max_tokens"), int) and value["max_tokens"] > 4:
        value["max_tokens"] = 4
        return json.dumps(value).encode()
    return body


ENDPOINTS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
             ("GET", "/health"), ("GET", "/metrics"), ("POST", "/v1/models"), ("PUT", "/v1/completions"),
             ("POST", "/health"), ("DELETE", "/metrics"), ("POST", "/v1/nowhere"), ("GET", "/v1/chat/completions")]


async def test_random_and_malformed_json_on_every_endpoint(hostile: Hostile) -> None:
    rng = random.Random(11)
    seen: dict[int, int] = {}
    async with beside_good_client(hostile) as client:
        for i in range(400):
            method, path = ENDPOINTS[i % len(ENDPOINTS)]
            body = _cap(_random_body(rng, chat="chat" in path))
            headers = {"content-type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
            response = await client.request(method, path, content=body, headers=headers)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (method, path, body[:300], response.text[:500])
            if response.status_code >= 400:
                assert_error(response, 400, 404, 405)
            elif path.startswith("/v1/") and method == "POST":
                assert response.status_code == 200
    assert seen.get(400, 0) > 50 and seen.get(200, 0) > 20, seen  # both paths were exercised


async def test_huge_bodies_get_413(hostile: Hostile) -> None:
    big = json.dumps({"prompt": "a" * (MAX_BODY * 4), "max_tokens": 2}).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no content-length: the limit still holds
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    async with beside_good_client(hostile) as client:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
            error = assert_error(await client.post(path, content=big, headers=JSON), 413)
            assert error["code"] == "request_too_large"
            assert_error(await client.post(path, content=chunked()), 413)
        # A declared length far beyond the limit is refused before the body is read.
        raw = await anyio.connect_tcp("127.0.0.1", hostile.server.port)
        async with raw:
            await raw.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 10000000000\r\n\r\n{\"prompt\": ")
            with anyio.fail_after(10):
                reply = await raw.receive()
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        # Just under the limit: read in full and answered with a specific error.
        near = json.dumps({"prompt": "a" * (MAX_BODY - 100), "max_tokens": 2}).encode()
        assert len(near) <= MAX_BODY
        assert assert_error(await client.post("/v1/completions", content=near, headers=JSON), 400)["code"] == "context_length_exceeded"


async def test_invalid_utf8_and_lone_surrogates(hostile: Hostile) -> None:
    # Bytes that are not UTF-8 at all: the body cannot be read, a 400.
    broken = [
        b'{"prompt": "\xff\xfe", "max_tokens": 2}',
        b'{"prompt": "ok", "max_tokens": 2, "stop": "\xc0\xaf"}',
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}], "max_tokens": 2}',
        b'{"messages": [{"role": "user", "content": "\x80abc"}], "max_tokens": 2}',
    ]
    # Valid JSON whose strings are odd (lone surrogates, a BOM): a 400 or an ordinary answer.
    odd = [
        b'\xef\xbb\xbf{"prompt": "bom", "max_tokens": 2}',
        b'{"prompt": "\\ud800", "max_tokens": 2}',
        b'{"prompt": "a\\udfffb", "max_tokens": 2, "stop": ["\\ud83d"]}',
        b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}',
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 2}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true, "stop": "\\udbff"}',
    ]
    async with beside_good_client(hostile) as client:
        for body in broken + odd:
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            response = await client.post(path, content=body, headers={"content-type": "application/json"})
            if body in broken or response.status_code != 200:
                assert_error(response, 400)
            else:
                assert response.json()["choices"] or "data:" in response.text


async def test_prompts_of_only_special_tokens(hostile: Hostile) -> None:
    async with beside_good_client(hostile) as client:
        for text in ("<|im_start|><|im_end|>" * 20, "<|endoftext|>" * 30, "".join(SPECIAL) * 10):
            response = await client.post("/v1/completions", json={"prompt": text, "max_tokens": 4})
            assert response.status_code == 200, response.text
            chat = {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=chat) as streamed:
                assert streamed.status_code == 200
                assert "error" not in (await streamed.aread()).decode()
        for ids in (list(SPECIAL_IDS) * 20, [SPECIAL_IDS[0]] * 60, [SPECIAL_IDS[1]]):
            response = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4})
            assert response.status_code == 200, response.text
        # Ids outside the vocabulary, and an over-long special-token prompt: specific 400s.
        assert assert_error(await client.post("/v1/completions", json={"prompt": [320], "max_tokens": 2}), 400)
        assert assert_error(await client.post("/v1/completions", json={"prompt": [2**40], "max_tokens": 2}), 400)
        too_long = {"prompt": list(SPECIAL_IDS) * MAX_MODEL_LEN, "max_tokens": 2}
        assert assert_error(await client.post("/v1/completions", json=too_long), 400)["code"] == "context_length_exceeded"


@pytest.mark.parametrize(("name", "value", "expect"), [
    ("max_tokens", 10**12, 400), ("max_tokens", 2**63, 400), ("max_tokens", 10**100, 400),
    ("max_tokens", MAX_MODEL_LEN, 400), ("max_tokens", 0, 400), ("max_tokens", -1, 400), ("max_tokens", 1.5, 400),
    ("max_completion_tokens", 10**18, 400), ("seed", 2**64, 400), ("seed", -(2**70), 400), ("top_k", 2**64, 400),
    ("top_k", 10**30, 400), ("logprobs", 10**9, 400), ("temperature", float("inf"), 400),
    ("seed", -5, 200), ("seed", 2**63 - 1, 200), ("temperature", 1e308, 200), ("top_k", 2**40, 200),
    ("stop", ["x"] * 5000, 400), ("stop", ["x" * 513], 400), ("stop", ["x" * 512] * 64, 200),
])  # fmt: skip
async def test_absurd_parameters(hostile: Hostile, name: str, value: Any, expect: int) -> None:
    """Out of range: a 400 naming the field. Merely extreme but servable: an answer."""
    async with beside_good_client(hostile) as client:
        for path in ("/v1/completions", "/v1/chat/completions"):
            if name == "max_completion_tokens" and path == "/v1/completions":
                continue
            body: dict[str, Any] = {name: value}
            if path == "/v1/completions":
                body["prompt"] = "hello"
            else:
                body["messages"] = [{"role": "user", "content": "hello"}]
            if name not in ("max_tokens", "max_completion_tokens"):
                body["max_tokens"] = 2
            if name == "logprobs" and path == "/v1/chat/completions":
                body["logprobs"], body["top_logprobs"] = True, value
            content = json.dumps(body).replace("Infinity", "1e999").encode()  # 1e999 parses as inf
            response = await client.post(path, content=content, headers=JSON)
            if expect == 200:
                assert response.status_code == 200, response.text
            else:
                error = assert_error(response, 400)
                assert error["param"] in (name, "prompt", "top_logprobs"), error


def test_nothing_leaked_in_the_server(hostile: Hostile) -> None:
    """After all of the above: idle, the same answer, and no stray descriptor growth."""
    metrics = anyio.run(wait_idle, hostile.server.base_url)
    assert not {k for k in metrics if k.startswith("shardline:http_responses_total:5")}, metrics
    assert anyio.run(_reference, hostile.server.base_url) == hostile.expected
    # Hundreds of connections came and went, many of them hostile; the server closes its side
    # of each once the client has gone, so the count settles back near where it started.
    pid = hostile.server.proc.pid
    limit = hostile.fds_before + FD_GROWTH_ALLOWED
    deadline = time.monotonic() + 30
    while (now := open_fds(pid)) > limit and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now <= limit, (
        f"the server holds {now} descriptors, {now - hostile.fds_before} more than the "
        f"{hostile.fds_before} it held after its first answer: {fd_kinds(pid)}"
    )
