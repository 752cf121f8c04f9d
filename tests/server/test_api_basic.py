"""The endpoints against the fake engine: bodies, streaming format, usage, logprobs, params."""

from __future__ import annotations

import httpx
import pytest

from server.conftest import MODEL
from server.fake_engine import FakeEngine, expected_text
from server.helpers import parse_sse

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


async def test_models_lists_the_served_model(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == fake_engine.max_model_len


async def test_health_is_ok_while_engine_runs(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200


async def test_chat_returns_text_usage_and_finish_reason(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    response = await client.post(CHAT, json={"model": MODEL, "messages": MESSAGES, "max_tokens": 12})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected_text(12)}
    assert choice["finish_reason"] == "length"
    prompt_len = len(fake_engine.tokenizer.apply_chat_template(MESSAGES))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 12, "total_tokens": prompt_len + 12}


async def test_chat_accepts_text_content_parts_and_max_completion_tokens(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    response = await client.post(CHAT, json={"messages": messages, "max_completion_tokens": 5, "max_tokens": 50})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected_text(5)


async def test_default_max_tokens_runs_to_the_end_of_the_context(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    response = await client.post(COMPLETIONS, json={"prompt": "abcd"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == fake_engine.max_model_len - 4


@pytest.mark.parametrize("prompt", ["Once upon", [79, 110, 99, 101], ["Once"], [[79, 110]]])
async def test_completion_accepts_text_and_token_prompts(client: httpx.AsyncClient, prompt: object) -> None:
    response = await client.post(COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text(7)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7


@pytest.mark.parametrize("stop", ["fox", ["zzz", "brown"]])
async def test_stop_strings_end_the_text(client: httpx.AsyncClient, stop: object) -> None:
    response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 40, "stop": stop})
    body = response.json()
    stops = [stop] if isinstance(stop, str) else stop
    assert body["choices"][0]["text"] == expected_text(40, stops)
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_sampling_fields_reach_the_engine(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fields = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 1234,
              "presence_penalty": 0.5, "frequency_penalty": -0.5}
    response = await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3, **fields})
    assert response.status_code == 200, response.text
    params = fake_engine.last_params
    assert params is not None
    for name, value in fields.items():
        assert getattr(params, name) == value, name
    assert params.max_tokens == 3


async def test_chat_stream_format_and_usage(client: httpx.AsyncClient) -> None:
    body = {"messages": MESSAGES, "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 9
    content_chunks = chunks[1:-1]
    assert all(c["usage"] is None for c in content_chunks)
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in content_chunks)
    assert text == expected_text(9)
    assert [c["choices"][0]["finish_reason"] for c in content_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks[:-1])


@pytest.mark.parametrize("logprobs", [False, True])
async def test_chat_stream_deltas_leave_out_the_role_after_the_first(
    client: httpx.AsyncClient, logprobs: bool
) -> None:
    """As OpenAI: the first delta is {"role": "assistant", "content": ""}, later ones carry
    no `role` key at all (not `"role": null`); the chunks' other None fields stay null."""
    body = {"messages": MESSAGES, "max_tokens": 5, "stream": True, "logprobs": logprobs}
    chunks = parse_sse((await client.post(CHAT, json=body)).text)[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    later = [c["choices"][0] for c in chunks[1:]]
    assert len(later) == 5
    for choice in later:
        assert set(choice["delta"]) == {"content"}, choice
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}, choice
    assert all(c["usage"] is None for c in chunks)  # still present, as null
    if not logprobs:
        assert all(choice["logprobs"] is None for choice in later)
    # A non-streamed response keeps its shape (null fields included).
    whole = (await client.post(CHAT, json={**body, "stream": False})).json()
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": expected_text(5)}
    assert "logprobs" in whole["choices"][0]


async def test_stream_without_include_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 4, "stream": True})
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])
    assert all(e["usage"] is None for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected_text(4)
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_completion_stream_with_usage(client: httpx.AsyncClient) -> None:
    body = {"prompt": "abc", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
    events = parse_sse((await client.post(COMPLETIONS, json=body)).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


async def test_chat_logprobs(client: httpx.AsyncClient) -> None:
    body = {"messages": MESSAGES, "max_tokens": 5, "logprobs": True, "top_logprobs": 3}
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == expected_text(5)
    for entry in content:
        assert entry["logprob"] == -0.5
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3


async def test_chat_logprobs_streamed(client: httpx.AsyncClient) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "stream": True}
    events = parse_sse((await client.post(CHAT, json=body)).text)
    entries = [e for c in events[1:-1] for e in c["choices"][0]["logprobs"]["content"]]
    assert "".join(e["token"] for e in entries) == expected_text(4)
    assert all(e["top_logprobs"] == [] for e in entries)


async def test_completion_logprobs(client: httpx.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 6, "logprobs": 2})
    logprobs = response.json()["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == expected_text(6)
    assert logprobs["token_logprobs"] == [-0.5] * 6
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == list(range(6))
