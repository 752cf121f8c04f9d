"""`/metrics` parses as Prometheus text and moves; a client that hangs up aborts its request."""

from __future__ import annotations

import functools

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from server.conftest import MODEL
from server.fake_engine import FakeEngine
from server.helpers import asgi_client, uvicorn_server
from support.waiting import wait_until

CHAT = "/v1/chat/completions"
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by (name, sorted labels)."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return samples.get(key, 0.0)


MODEL_LABELS = {"model_name": MODEL, "engine": "0"}


async def test_metrics_parse_and_move_with_traffic(client: httpx.AsyncClient) -> None:
    """The engine's counters and gauges (a fake engine here, whose statistics are exact) under
    vLLM's names; the HTTP layer's own counter. tests/server/test_metrics_engine.py has the real
    engine's histograms."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    before = scrape(response.text)
    for name in ("shardline:num_requests_running", "shardline:num_requests_waiting",
                 "shardline:kv_cache_blocks_total", "shardline:kv_cache_blocks_used",
                 "shardline:kv_cache_usage_perc", "shardline:num_preemptions_total",
                 "shardline:prompt_tokens_total", "shardline:generation_tokens_total",
                 "shardline:prefix_cache_queries_total", "shardline:prefix_cache_hits_total"):
        assert (name, tuple(sorted(MODEL_LABELS.items()))) in before, name
    assert value(before, "shardline:kv_cache_blocks_total", **MODEL_LABELS) == 64
    # The fake engine keeps no histograms: none is exported (never a made-up zero).
    assert not any(name.startswith("shardline:time_to_first_token") for name, _ in before)

    assert (await client.post(CHAT, json=GOOD_CHAT)).status_code == 200
    assert (await client.post(CHAT, json={**GOOD_CHAT, "stream": True})).status_code == 200
    assert (await client.post(CHAT, json={**GOOD_CHAT, "model": "other"})).status_code == 404

    after = scrape((await client.get("/metrics")).text)
    assert value(after, "shardline:generation_tokens_total", **MODEL_LABELS) == 12
    assert value(after, "shardline:request_success_total", finished_reason="length", **MODEL_LABELS) == 2
    assert value(after, "shardline:prompt_tokens_total", **MODEL_LABELS) > 0
    assert value(after, "shardline:http_responses_total", path=CHAT, status="200") == 2
    assert value(after, "shardline:http_responses_total", path=CHAT, status="404") == 1


@pytest.fixture
def slow_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096, token_delay=0.02)


@pytest.fixture
def slow_app(slow_engine: FakeEngine) -> FastAPI:
    from shardline.engine.server import build_app

    return build_app(slow_engine, served_model_name=MODEL, api_key=None)


def _kv_used(text: str) -> float:
    return value(scrape(text), "shardline:kv_cache_blocks_used", **MODEL_LABELS)


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
async def test_disconnect_mid_stream_aborts_and_frees_blocks(slow_engine: FakeEngine, slow_app: FastAPI, path: str) -> None:
    body = {"prompt": "Hello"} if path != CHAT else {"messages": GOOD_CHAT["messages"]}
    async with uvicorn_server(slow_app) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        async with client.stream("POST", path, json={**body, "max_tokens": 2000, "stream": True}) as response:
            assert response.status_code == 200
            received = ""
            async for piece in response.aiter_text():
                received += piece
                if received.count("data: ") >= 5:
                    break
            # The request is live and holds KV blocks while we read.
            assert _kv_used((await client.get("/metrics")).text) > 0
        # Leaving the block closed the connection mid-stream.
        # 2000 tokens at 20 ms each would take 40 s: only an abort ends it this soon.
        await wait_until(lambda: slow_engine.stats().requests_finished.get("abort") == 1)
        assert slow_engine.stats().num_running == 0
        assert _kv_used((await client.get("/metrics")).text) == 0
        after = scrape((await client.get("/metrics")).text)
        assert value(after, "shardline:request_success_total", finished_reason="abort", **MODEL_LABELS) == 1
        # The server keeps serving.
        response = await client.post(path, json={**body, "max_tokens": 3})
        assert response.status_code == 200


async def test_disconnect_while_waiting_for_whole_answer_aborts(slow_engine: FakeEngine, slow_app: FastAPI) -> None:
    async with uvicorn_server(slow_app) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client, anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(client.post, CHAT, json={**GOOD_CHAT, "max_tokens": 2000}))
            await wait_until(lambda: slow_engine.stats().num_running == 1)
            tg.cancel_scope.cancel()  # the client gives up: its connection closes
        await wait_until(lambda: slow_engine.stats().requests_finished.get("abort") == 1)
        assert slow_engine.stats().num_running == 0
        async with httpx.AsyncClient(base_url=base_url) as client:
            response = await client.post(CHAT, json=GOOD_CHAT)
            assert response.status_code == 200


async def test_metrics_route_answers_for_the_asgi_client(app: FastAPI) -> None:
    async with asgi_client(app) as client:
        families = {f.name for f in text_string_to_metric_families((await client.get("/metrics")).text)}
    assert {"shardline:num_requests_running", "shardline:request_success", "process_cpu_seconds"} <= families
