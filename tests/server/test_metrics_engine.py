"""`/metrics` of a real (tiny, random) engine, parsed by prometheus_client after real requests:
counters move by what the responses reported, histograms observe each request, vLLM's names."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.helpers import asgi_client
from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.server import build_app

NAME = "tiny"
ENGINE0 = {"model_name": NAME, "engine": "0"}
# A prompt of several 4-token blocks, sent twice: the second reads its prefix from the cache.
LONG_PROMPT = "the same words again and again, " * 3
HISTOGRAMS = (
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
    "request_inference_time_seconds", "request_time_per_output_token_seconds", "request_prompt_tokens",
    "request_generation_tokens", "request_params_max_tokens", "iteration_tokens_total",
)  # fmt: skip

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _config(path: pathlib.Path, **kw: Any) -> EngineConfig:
    base: dict[str, Any] = dict(model=str(path), served_model_name=NAME, max_model_len=256, num_kv_blocks=128,
                                block_size=4, transport="inproc", log_stats_interval=0)  # fmt: skip
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def engine_config(tiny_llama_dir: pathlib.Path) -> EngineConfig:
    return _config(tiny_llama_dir)


@pytest.fixture
async def engine(engine_config: EngineConfig) -> AsyncIterator[Engine]:
    async with await Engine.start(engine_config) as eng:
        yield eng


async def _scrape(client: httpx.AsyncClient) -> tuple[Samples, dict[str, str]]:
    """Every sample keyed by (name, sorted labels), and each family's type by name."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return _get(after, name, **labels) - _get(before, name, **labels)


async def _completion(client: httpx.AsyncClient, prompt: str, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/completions", json={"prompt": prompt, "temperature": 0.0, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_counters_and_histograms_follow_real_requests(engine: Engine) -> None:
    greedy_first = [
        out
        async for out in engine.generate(LONG_PROMPT, SamplingParams(max_tokens=1, temperature=0))
    ]
    first_token = greedy_first[-1].token_ids[0]
    app = build_app(engine, served_model_name=NAME, api_key=None)
    async with asgi_client(app) as client:
        before, types = await _scrape(client)
        first = await _completion(client, LONG_PROMPT, max_tokens=6, ignore_eos=True)
        again = await _completion(client, LONG_PROMPT, max_tokens=6, ignore_eos=True)
        # Stopping on the greedy first token: finished_reason "stop" after one token.
        stopped = await _completion(client, LONG_PROMPT, max_tokens=6, stop_token_ids=[first_token])
        streamed = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
        assert streamed.status_code == 200
        chat_usage = [e for e in _events(streamed.text) if e.get("usage")][-1]["usage"]
        after, types = await _scrape(client)

    usages = [first["usage"], again["usage"], stopped["usage"], chat_usage]
    assert [first["choices"][0]["finish_reason"], stopped["choices"][0]["finish_reason"]] == [
        "length",
        "stop",
    ]
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    generated = [u["completion_tokens"] for u in usages]
    assert _delta(after, before, "shardline:prompt_tokens_total", **ENGINE0) == prompt_tokens
    assert _delta(after, before, "shardline:generation_tokens_total", **ENGINE0) == sum(generated)
    success = "shardline:request_success_total"
    assert _delta(after, before, success, finished_reason="length", **ENGINE0) == 3
    assert _delta(after, before, success, finished_reason="stop", **ENGINE0) == 1
    assert _delta(after, before, success, finished_reason="abort", **ENGINE0) == 0
    # The repeated prompt found its full blocks in the prefix cache.
    assert _delta(after, before, "shardline:prefix_cache_hits_total", **ENGINE0) >= 4 * 4
    queries = _delta(after, before, "shardline:prefix_cache_queries_total", **ENGINE0)
    assert queries >= prompt_tokens
    assert _get(after, "shardline:num_requests_running", **ENGINE0) == 0
    assert _get(after, "shardline:kv_cache_blocks_total", **ENGINE0) == 128
    assert 0 <= _get(after, "shardline:kv_cache_usage_perc", **ENGINE0) <= 1
    assert _get(after, "shardline:cache_config_info", **ENGINE0, block_size="4", cache_dtype="auto", enable_prefix_caching="True",
                gpu_memory_utilization="0.9", num_gpu_blocks="128") == 1  # fmt: skip

    # Each finished request is observed once; each token after a request's first is one gap.
    def count(name: str) -> float:
        return _delta(after, before, f"shardline:{name}_count", **ENGINE0)

    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens"):  # fmt: skip
        assert count(name) == 4, name
        assert types[f"shardline:{name}"] == "histogram"
        assert _delta(after, before, f"shardline:{name}_bucket", le="+Inf", **ENGINE0) == 4, name
    assert count("inter_token_latency_seconds") == sum(g - 1 for g in generated)
    assert count("request_time_per_output_token_seconds") == sum(1 for g in generated if g > 1)
    assert _delta(after, before, "shardline:request_prompt_tokens_sum", **ENGINE0) == prompt_tokens
    assert _delta(after, before, "shardline:request_generation_tokens_sum", **ENGINE0) == sum(
        generated
    )
    assert _delta(after, before, "shardline:request_params_max_tokens_sum", **ENGINE0) == 6 * 3 + 4
    # Every step schedules at least one token; the decode steps alone are sum(generated) - 4.
    assert count("iteration_tokens_total") >= sum(generated) - 4
    assert (
        _delta(after, before, "shardline:iteration_tokens_total_sum", **ENGINE0)
        >= prompt_tokens - queries + 1
    )
    assert _get(after, "shardline:time_to_first_token_seconds_sum", **ENGINE0) > 0

    # Process metrics, and nothing outside the `shardline:` namespace but them.
    assert _get(after, "process_cpu_seconds_total") > 0
    assert _get(after, "process_resident_memory_bytes") > 0
    assert "python_info" in types
    for name in types:
        assert name.startswith(("shardline:", "process_", "python_")), name
    # (The HTTP counter, the one family the server keeps, is by path and status.)
    engine_families = [
        n for n in types if n.startswith("shardline:") and not n.startswith("shardline:http_")
    ]
    assert {f"shardline:{h}" for h in HISTOGRAMS} <= set(engine_families)
    for (name, labels), _ in after.items():
        if any(name.startswith(f) for f in engine_families):
            assert {"model_name", "engine"} <= dict(labels).keys(), name


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_two_apps_in_one_process_keep_their_own_registry(engine: Engine) -> None:
    """Each app's registry is its own: nothing is registered twice, nothing leaks to the global one."""
    from prometheus_client import REGISTRY

    global_names = set(REGISTRY._names_to_collectors)
    first, second = (build_app(engine, served_model_name=NAME, api_key=None) for _ in range(2))
    async with asgi_client(first) as one, asgi_client(second) as two:
        await _completion(one, "hi", max_tokens=2)
        on_first, _ = await _scrape(one)
        on_second, _ = await _scrape(two)
    route = {"path": "/v1/completions", "status": "200"}
    assert _get(on_first, "shardline:http_responses_total", **route) == 1
    assert _get(on_second, "shardline:http_responses_total", **route) == 0
    # Both read the same engine.
    tokens = "shardline:generation_tokens_total"
    assert _get(on_first, tokens, **ENGINE0) == _get(on_second, tokens, **ENGINE0) > 0
    assert set(REGISTRY._names_to_collectors) == global_names


async def test_data_parallel_replicas_are_labelled_by_engine(tiny_llama_dir: pathlib.Path) -> None:
    config = _config(tiny_llama_dir, transport="shm", data_parallel_size=2)
    async with await Engine.start(config) as engine, asgi_client(
            build_app(engine, served_model_name=NAME, api_key=None)) as client:  # fmt: skip
        replies = await asyncio.gather(*(_completion(client, f"request {i}", max_tokens=3, ignore_eos=True)
                                         for i in range(8)))  # fmt: skip
        samples, _ = await _scrape(client)
    per_engine = [{"model_name": NAME, "engine": str(i)} for i in (0, 1)]
    served = [
        _get(samples, "shardline:e2e_request_latency_seconds_count", **labels)
        for labels in per_engine
    ]
    assert sum(served) == 8 and min(served) > 0, served
    assert sum(
        _get(samples, "shardline:generation_tokens_total", **labels) for labels in per_engine
    ) == sum(r["usage"]["completion_tokens"] for r in replies)
    assert [_get(samples, "shardline:request_success_total", finished_reason="length", **labels)
            for labels in per_engine] == served  # fmt: skip
