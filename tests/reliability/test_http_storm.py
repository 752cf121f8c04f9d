"""Cancellation storm over HTTP: 1,000 requests of every kind, most abandoned at random moments.

Clients cancel before the answer, hang up mid-stream, or send half a request and close the
socket. Afterwards the engine must hold nothing (no KV block, no running or waiting request),
nothing may have been answered with a 5xx, and the server must still give the same greedy
answer it gave before the storm.
"""

from __future__ import annotations

import json
import pathlib
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from reliability.http_support import (
    CHAT,
    assert_no_server_errors,
    reference_text,
    stop_cleanly,
    stream_text,
    tiny_server,
    wait_idle,
)

NUM_REQUESTS = 1000
CONCURRENCY = 64
STORM_DEADLINE_S = 240.0  # the whole storm; one request never waits longer than this either
SEED = 7


@dataclass(frozen=True)
class Plan:
    """What one storm request does."""

    path: str  # /v1/completions or /v1/chat/completions
    stream: bool
    max_tokens: int
    fate: str  # finish | cancel (client task cancelled) | hangup (stream closed mid-way) | half (raw socket)
    delay_s: float  # when `cancel` fires
    events: int  # how many stream events `hangup` reads first

    def body(self, i: int) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0, "stream": self.stream}
        if self.path == "/v1/completions":
            body["prompt"] = f"storm request {i}: " + "xy" * (i % 11)
        else:
            body["messages"] = [{"role": "user", "content": f"storm {i} " + "z" * (i % 13)}]
        return body


def make_plans(rng: random.Random, count: int) -> list[Plan]:
    plans = []
    for _ in range(count):
        stream = rng.random() < 0.5
        fates = ["finish", "cancel", "hangup", "half"] if stream else ["finish", "cancel", "half"]
        weights = [3, 4, 4, 1] if stream else [4, 5, 1]
        plans.append(Plan(
            path=rng.choice(["/v1/completions", "/v1/chat/completions"]),
            stream=stream,
            max_tokens=rng.randint(2, 48),  # long enough that many are mid-generation when abandoned
            fate=rng.choices(fates, weights)[0],
            delay_s=rng.uniform(0.0, 0.4),
            events=rng.randint(1, 6),
        ))  # fmt: skip
    return plans


async def half_request(port: int, body: dict[str, Any], path: str, rng: random.Random) -> str:
    """Send the headers and part of the body (or all of it), then close the socket unread."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    cut = rng.randint(0, len(payload))
    sock = await anyio.connect_tcp("127.0.0.1", port)
    async with sock:
        await sock.send(head + payload[:cut])
        await anyio.sleep(rng.uniform(0, 0.2))
    return "half"


async def run_one(client: httpx.AsyncClient, port: int, i: int, plan: Plan, rng: random.Random) -> str:
    """Carry out `plan`; returns an outcome tag. Raises on any answer a client must not get."""
    body = plan.body(i)
    if plan.fate == "half":
        return await half_request(port, body, plan.path, rng)
    if plan.fate == "cancel":
        with anyio.move_on_after(plan.delay_s):
            await _finish(client, plan, body)
            return "finished-before-cancel"
        return "cancelled"
    if plan.fate == "hangup":
        async with client.stream("POST", plan.path, json=body) as response:
            assert response.status_code == 200, await response.aread()
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= plan.events:
                    return "hung-up"
        return "finished-before-hangup"
    await _finish(client, plan, body)
    return "finished"


async def _finish(client: httpx.AsyncClient, plan: Plan, body: dict[str, Any]) -> None:
    if plan.stream:
        text = await stream_text(client, plan.path, body)
        assert isinstance(text, str)
        return
    response = await client.post(plan.path, json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("length", "stop"), choice


async def run_storm(client: httpx.AsyncClient, port: int, seed: int) -> tuple[Counter[str], list[str], float]:
    """NUM_REQUESTS planned requests, CONCURRENCY at a time; outcomes, failures and seconds."""
    plans = make_plans(random.Random(seed), NUM_REQUESTS)
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    limiter = anyio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with limiter:
            try:
                outcomes[await run_one(client, port, i, plans[i], random.Random(seed * 100_003 + i))] += 1
            except Exception as exc:  # noqa: BLE001 - collected and reported by the caller
                failures.append(f"request {i} {plans[i]}: {exc!r}")

    started = time.monotonic()
    with anyio.fail_after(STORM_DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for i in range(NUM_REQUESTS):
                tg.start_soon(one, i)
    return outcomes, failures, time.monotonic() - started


@pytest.mark.timeout(420)
async def test_cancellation_storm_leaves_nothing_behind(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with tiny_server(tiny_llama_dir, tmp_path, "--max-num-seqs", "64") as server:
        limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
            before = await reference_text(client)
            chat_body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
            chat_before = (await client.post("/v1/chat/completions", json=chat_body)).json()

            outcomes, failures, storm_s = await run_storm(client, server.port, SEED)
            assert not failures, f"{len(failures)} failures, e.g. " + "\n".join(failures[:5])
            assert sum(outcomes.values()) == NUM_REQUESTS
            # The storm really was a storm: plenty abandoned, plenty answered.
            assert outcomes["cancelled"] + outcomes["hung-up"] + outcomes["half"] >= NUM_REQUESTS // 3, outcomes
            assert outcomes["finished"] >= NUM_REQUESTS // 10, outcomes

            metrics = await wait_idle(server.base_url, deadline_s=30)
            aborted = metrics.get("shardline:request_success_total:abort", 0)
            assert aborted >= NUM_REQUESTS // 10, f"only {aborted} aborts seen by the engine: {outcomes}"
            server_errors = {k: v for k, v in metrics.items()
                             if k.startswith("shardline:http_responses_total:5")}
            assert not server_errors, server_errors

            after = await reference_text(client)
            assert after == before, "the greedy answer changed after the storm"
            chat_after = (await client.post("/v1/chat/completions", json=chat_body)).json()
            assert chat_after["choices"][0]["message"] == chat_before["choices"][0]["message"]
            # Stays idle: nothing was left queued to wake up later.
            metrics = await wait_idle(server.base_url, deadline_s=5)
            assert metrics["shardline:kv_cache_blocks_used"] == 0
        print(f"storm: {NUM_REQUESTS} requests in {storm_s:.1f} s: {dict(outcomes)}; engine aborts {aborted:.0f}")
        stop_cleanly(server)
        assert_no_server_errors(server.log())


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_repeated_storms_slow(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Three storms in a row on one server: still idle and correct after each."""
    with tiny_server(tiny_llama_dir, tmp_path, "--max-num-seqs", "64") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60,
                                     limits=httpx.Limits(max_connections=CONCURRENCY * 2)) as client:
            before = await reference_text(client)
            for storm in range(3):
                _, failures, _ = await run_storm(client, server.port, SEED * 100 + storm)
                assert not failures, failures[:5]
                await wait_idle(server.base_url, deadline_s=30)
                assert await reference_text(client) == before
        stop_cleanly(server)
        assert_no_server_errors(server.log())
