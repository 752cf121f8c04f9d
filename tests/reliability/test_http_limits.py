"""Limits over HTTP: a full queue answers 429 (and recovers); a dead engine answers 503 and
`shardline serve` exits non-zero by itself."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time
from typing import Any

import anyio
import httpx
import psutil
import pytest

from reliability.http_support import (
    reference_text,
    scrape,
    stop_cleanly,
    tiny_server,
    wait_idle,
    worker_processes,
)
from server.helpers import assert_openai_error
from support.leaks import our_shm_entries
from support.waiting import wait_until

MAX_WAITING = 4


def _held(base_url: str) -> tuple[float, float]:
    metrics = scrape(base_url)
    return metrics["shardline:num_requests_running"], metrics["shardline:num_requests_waiting"]


LONG_BODY: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": 230, "temperature": 0}


async def _hold(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    """A streamed request read slowly until the test cancels it (the engine holds it meanwhile)."""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for _ in response.aiter_lines():
            pass


async def test_full_queue_answers_429_then_serves(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with tiny_server(tiny_llama_dir, tmp_path, "--max-waiting-requests", str(MAX_WAITING),
                     "--max-num-seqs", "2") as server:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            before = await reference_text(client)
            # The held requests must really run that long: the greedy text does not stop early.
            check = (await client.post("/v1/completions", json=LONG_BODY)).json()
            assert check["choices"][0]["finish_reason"] == "length", check

            async with anyio.create_task_group() as holders:
                for _ in range(MAX_WAITING):  # fill the engine: 2 running, 2 waiting
                    holders.start_soon(_hold, client, LONG_BODY)
                await wait_until(lambda: _held(server.base_url) == (2, 2), deadline_s=30)

                # A burst beyond the limit, of every kind: each refused at once with 429.
                statuses: list[int] = []

                async def refused(path: str, stream: bool) -> None:
                    body: dict[str, Any] = {"max_tokens": 8, "stream": stream}
                    if path == "/v1/completions":
                        body["prompt"] = "one too many"
                    else:
                        body["messages"] = [{"role": "user", "content": "one too many"}]
                    response = await client.post(path, json=body)
                    assert_openai_error(response, 429, type="rate_limit_error", code="engine_overloaded")
                    statuses.append(response.status_code)

                async with anyio.create_task_group() as tg:
                    for i in range(32):
                        tg.start_soon(refused, ("/v1/completions", "/v1/chat/completions")[i % 2], i % 4 < 2)
                assert statuses == [429] * 32
                # Refused requests never reached the queue: it did not grow past its bound.
                assert sum(_held(server.base_url)) <= MAX_WAITING
                holders.cancel_scope.cancel()  # hang up on the four held streams

            await wait_idle(server.base_url)
            assert await reference_text(client) == before
            # Up to the limit, concurrent requests are all served.
            results = []

            async def served() -> None:
                results.append(await reference_text(client))

            async with anyio.create_task_group() as tg:
                for _ in range(MAX_WAITING):
                    tg.start_soon(served)
            assert results == [before] * MAX_WAITING
            metrics = scrape(server.base_url)
            assert metrics["shardline:http_responses_total:429:/v1/completions"] == 16
            assert metrics["shardline:http_responses_total:429:/v1/chat/completions"] == 16
        stop_cleanly(server)


@pytest.mark.timeout(240)
async def test_dead_engine_answers_503_and_serve_exits(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    shm_before = set(our_shm_entries())
    with tiny_server(tiny_llama_dir, tmp_path, "--max-worker-restarts", "0") as server:
        workers = worker_processes(server)
        assert len(workers) == 1, workers
        outcomes: dict[str, Any] = {}
        streaming_started = anyio.Event()
        started_count = 0

        async def streamed(i: int) -> None:
            nonlocal started_count
            events: list[Any] = []
            async with client.stream("POST", "/v1/completions", json={**LONG_BODY, "stream": True}) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: "):]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        if len(events) == 2:
                            started_count += 1
                            if started_count == 4:
                                streaming_started.set()
            outcomes[f"stream{i}"] = events

        async def whole(i: int) -> None:
            outcomes[f"whole{i}"] = await client.post("/v1/completions", json=LONG_BODY)

        health: list[int | str] = []

        async def poll_health() -> None:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as probe:
                while server.proc.poll() is None:
                    try:
                        health.append((await probe.get("/health")).status_code)
                    except httpx.HTTPError as exc:
                        health.append(type(exc).__name__)
                    await anyio.sleep(0.02)

        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            with anyio.fail_after(60):  # nothing may hang
                async with anyio.create_task_group() as tg:
                    for i in range(4):
                        tg.start_soon(streamed, i)
                    for i in range(2):
                        tg.start_soon(whole, i)
                    await streaming_started.wait()
                    tg.start_soon(poll_health)
                    killed_at = time.monotonic()
                    os.kill(workers[0].pid, signal.SIGKILL)
            # The server stops by itself, with a non-zero code.
            code = await anyio.to_thread.run_sync(lambda: server.proc.wait(timeout=30))
            exit_s = time.monotonic() - killed_at
        assert code == 1, server.log()[-3000:]
        assert exit_s < 10, f"serve took {exit_s:.1f} s to exit after its engine died"
        for i in range(4):
            events = outcomes[f"stream{i}"]
            assert events[-1] == "[DONE]", events[-3:]
            assert "error" in events[-2], events[-3:]
            assert events[-2]["error"]["code"] == "engine_dead", events[-2]
        for i in range(2):
            assert_openai_error(outcomes[f"whole{i}"], 503, code="engine_dead")
        print(f"serve exited {exit_s:.1f} s after the kill; /health saw {health}")
        assert health.count(503) >= 3, health  # the server lingers a moment answering 503
        assert 200 not in health[health.index(503):], health  # never healthy again
        assert "the engine died" in server.log()
        # Nothing left: no worker process, no shared memory of ours.
        for worker in workers:
            assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
        ours = f"shardline_{server.proc.pid}_"  # names carry the creating pid; others' tests run too
        assert not [n for n in set(our_shm_entries()) - shm_before if ours in n]


async def test_engine_refuses_integers_beyond_64_bits(tiny_llama_dir: pathlib.Path) -> None:
    """A seed or top_k msgpack cannot carry is the caller's error, not the engine's death.

    (Before the check, `seed=2**64` made the step unencodable and stopped the engine for
    every caller; the HTTP schema now refuses it too, so this goes through the Python API.)
    """
    from shardline.engine import Engine, EngineConfig, InvalidRequestError, SamplingParams

    config = EngineConfig(model=str(tiny_llama_dir), transport="inproc", max_model_len=64)
    async with await Engine.start(config) as engine:
        for params in (SamplingParams(max_tokens=2, seed=2**64), SamplingParams(max_tokens=2, top_k=2**70)):
            with pytest.raises(InvalidRequestError):
                async for _ in engine.generate("hello", params):
                    pass
        outputs = [out async for out in engine.generate("hello", SamplingParams(max_tokens=2, seed=2**63 - 1))]
        assert outputs[-1].finished and outputs[-1].finish_reason == "length"
        assert not engine.is_dead
