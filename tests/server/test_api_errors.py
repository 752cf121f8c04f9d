"""Every error the server answers: status code and OpenAI error JSON, then a good request."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from server.conftest import MODEL
from server.fake_engine import FakeEngine, expected_text
from server.helpers import asgi_client, assert_openai_error, parse_sse, uvicorn_server
from shardline.engine.server import build_app

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
GOOD_COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}


async def assert_still_serves(client: httpx.AsyncClient) -> None:
    """A good chat request after an error succeeds on the same app."""
    response = await client.post(CHAT, json=GOOD_CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected_text(4)


@pytest.mark.parametrize(
    ("path", "overrides", "param"),
    [
        (CHAT, {"temperature": -1}, "temperature"),
        (CHAT, {"top_p": 0}, "top_p"),
        (CHAT, {"top_k": -5}, "top_k"),
        (CHAT, {"min_p": 1.5}, "min_p"),
        (CHAT, {"presence_penalty": 3}, "presence_penalty"),
        (CHAT, {"frequency_penalty": -9}, "frequency_penalty"),
        (CHAT, {"max_tokens": 0}, "max_tokens"),
        (CHAT, {"max_completion_tokens": -1}, "max_completion_tokens"),
        (CHAT, {"stop": [""]}, "stop"),
        (CHAT, {"n": 0}, "n"),
        (CHAT, {"n": 129}, "n"),
        (CHAT, {"logit_bias": {"x": 5}}, "logit_bias"),
        (CHAT, {"logit_bias": {"7": 101}}, "logit_bias"),
        (CHAT, {"logit_bias": {"300": 5}}, "logit_bias"),
        (CHAT, {"min_tokens": -1}, "min_tokens"),
        (CHAT, {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        (CHAT, {"prompt_logprobs": 21}, "prompt_logprobs"),
        (CHAT, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        (CHAT, {"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
        (CHAT, {"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "hologram"}]}]}, "messages"),
        (CHAT, {"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages"),
        (CHAT, {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),
        (COMPLETIONS, {"logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"n": 0}, "n"),
        (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"n": 2, "best_of": 3}, "best_of"),
        (COMPLETIONS, {"best_of": 2}, "best_of"),
        (COMPLETIONS, {"prompt": ["a"] * 1025}, "prompt"),
        (COMPLETIONS, {"prompt": ["a"] * 10, "n": 128}, "n"),
        (COMPLETIONS, {"prompt": ["a", ""]}, "prompt"),
        (COMPLETIONS, {"prompt": [[65], [7, 300]]}, "prompt"),
        (COMPLETIONS, {"prompt": ""}, "prompt"),
        (COMPLETIONS, {"prompt": [7, 300]}, "prompt"),
    ],
)
async def test_invalid_parameter_is_400_naming_the_field(
    client: httpx.AsyncClient, path: str, overrides: dict[str, object], param: str
) -> None:
    body = {**(GOOD_CHAT if path == CHAT else GOOD_COMPLETION), **overrides}
    response = await client.post(path, json=body)
    assert_openai_error(response, 400, type="invalid_request_error", param=param)
    await assert_still_serves(client)


@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_parameter_is_400_even_when_streaming(client: httpx.AsyncClient, stream: bool) -> None:
    response = await client.post(CHAT, json={**GOOD_CHAT, "temperature": -0.5, "stream": stream})
    assert_openai_error(response, 400, param="temperature", code="invalid_value")
    await assert_still_serves(client)


@pytest.mark.parametrize("stream", [False, True])
async def test_over_long_prompt_is_400_context_length_exceeded(
    client: httpx.AsyncClient, fake_engine: FakeEngine, stream: bool
) -> None:
    prompt = "x" * (fake_engine.max_model_len + 10)
    response = await client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 4, "stream": stream})
    assert_openai_error(response, 400, param="prompt", code="context_length_exceeded")
    # Prompt fits but prompt + max_tokens does not: max_tokens is what is wrong.
    response = await client.post(COMPLETIONS, json={"prompt": "x" * 200, "max_tokens": 100, "stream": stream})
    error = assert_openai_error(response, 400, param="max_tokens", code="context_length_exceeded")
    assert error["message"].startswith("invalid max_tokens: ") and "at most 56" in error["message"], error
    await assert_still_serves(client)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"max_tokens": 300}, "max_tokens"),
        ({"max_tokens": 4, "max_completion_tokens": 300}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 4}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": None}, "messages"),
    ],
    ids=["max_tokens", "max_completion_tokens", "long-messages", "long-messages-no-limit"],
)
async def test_chat_over_the_context_names_the_field_at_fault(
    client: httpx.AsyncClient, stream: bool, overrides: dict[str, object], param: str
) -> None:
    """A chat request whose prompt fits but whose token limit does not names that limit (not
    "prompt"); one whose messages alone are too long names `messages`."""
    body = {k: v for k, v in {**GOOD_CHAT, **overrides, "stream": stream}.items() if v is not None}
    response = await client.post(CHAT, json=body)
    error = assert_openai_error(response, 400, type="invalid_request_error", param=param,
                                code="context_length_exceeded")  # fmt: skip
    assert error["message"].startswith(f"invalid {param}: "), error
    if param.startswith("max_"):
        assert f"lower {param} to at most" in error["message"], error
    await assert_still_serves(client)


JSON_BODY = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/octet-stream"],
)  # fmt: skip
async def test_a_body_without_a_json_content_type_is_refused_as_not_json(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    """JSON bytes under another (or no) Content-Type: FastAPI does not read them as JSON; the
    answer says the body must be JSON, not pydantic's "Input should be a valid dictionary"."""
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post(CHAT, content=JSON_BODY, headers=headers)
    error = assert_openai_error(response, 400, type="invalid_request_error", param=None,
                                code="invalid_content_type")  # fmt: skip
    assert error["message"].startswith("the request body must be JSON (Content-Type: application/json)")
    assert (content_type or "no Content-Type") in error["message"], error
    assert "valid dictionary" not in error["message"]
    await assert_still_serves(client)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/merge-patch+json"])
async def test_json_content_types_with_parameters_or_suffixes_are_read(
    client: httpx.AsyncClient, content_type: str
) -> None:
    response = await client.post(CHAT, content=JSON_BODY, headers={"content-type": content_type})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("content", "headers", "param"),
    [
        (b"{not json", {"content-type": "application/json"}, None),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {"content-type": "application/json"}, None),
        (b"\xff\xfe\x00garbage", {"content-type": "application/json"}, None),
        (b"", {"content-type": "application/json"}, None),
        (b"[1, 2, 3]", {"content-type": "application/json"}, None),
        (b'"just a string"', {"content-type": "application/json"}, None),
        (b'{"messages": "hello"}', {"content-type": "application/json"}, "messages"),
        (b'{"messages": []}', {"content-type": "application/json"}, "messages"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', {"content-type": "application/json"}, "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
         {"content-type": "application/json"}, None),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
         {"content-type": "application/json"}, "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
         {"content-type": "application/json"}, "temperature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stream": {"a": 1}}',
         {"content-type": "application/json"}, "stream"),
        (b"messages=hello", {"content-type": "application/x-www-form-urlencoded"}, None),
        (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e400}',
         {"content-type": "application/json"}, "seed"),
    ],
)
async def test_malformed_body_is_400_never_500(
    client: httpx.AsyncClient, content: bytes, headers: dict[str, str], param: str | None
) -> None:
    response = await client.post(CHAT, content=content, headers=headers)
    error = assert_openai_error(response, 400, type="invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    await assert_still_serves(client)


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={**GOOD_CHAT, "model": "gpt-17"})
    error = assert_openai_error(response, 404, param="model", code="model_not_found")
    assert "gpt-17" in error["message"]
    response = await client.post(COMPLETIONS, json={**GOOD_COMPLETION, "model": "nope", "stream": True})
    assert_openai_error(response, 404, param="model", code="model_not_found")
    await assert_still_serves(client)


async def test_unknown_route_and_method_are_openai_shaped(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/engines"), 404)
    assert_openai_error(await client.get(CHAT), 405)
    await assert_still_serves(client)


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    huge = {**GOOD_CHAT, "messages": [{"role": "user", "content": "x" * (128 * 1024)}]}
    response = await client.post(CHAT, json=huge)
    assert_openai_error(response, 413, code="request_too_large")
    await assert_still_serves(client)


async def test_oversized_chunked_body_without_length_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}]}'

    response = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, code="request_too_large")
    await assert_still_serves(client)


async def test_overloaded_engine_is_429(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fake_engine.max_running = 0
    for stream in (False, True):
        response = await client.post(CHAT, json={**GOOD_CHAT, "stream": stream})
        assert_openai_error(response, 429, code="engine_overloaded")
    fake_engine.max_running = 10
    await assert_still_serves(client)


async def test_dead_engine_is_503_and_health_says_so(client: httpx.AsyncClient, fake_engine: FakeEngine) -> None:
    fake_engine.kill()
    assert_openai_error(await client.post(CHAT, json=GOOD_CHAT), 503, code="engine_dead")
    assert_openai_error(await client.post(COMPLETIONS, json={**GOOD_COMPLETION, "stream": True}), 503)
    assert_openai_error(await client.get("/health"), 503)
    fake_engine.revive()
    assert (await client.get("/health")).status_code == 200
    await assert_still_serves(client)


async def test_engine_death_mid_stream_ends_with_an_error_event(fake_engine: FakeEngine, app: FastAPI) -> None:
    fake_engine.token_delay = 0.01
    async with uvicorn_server(app) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        async with client.stream("POST", CHAT, json={**GOOD_CHAT, "max_tokens": 200, "stream": True}) as response:
            assert response.status_code == 200
            text = ""
            async for piece in response.aiter_text():
                text += piece
                if text.count("data: ") >= 4 and not fake_engine.is_dead:
                    fake_engine.kill()
        events = parse_sse(text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "engine_dead"
        fake_engine.revive()
        fake_engine.token_delay = 0.0
        await assert_still_serves(client)


@pytest.fixture
def keyed_app(fake_engine: FakeEngine) -> FastAPI:
    return build_app(fake_engine, served_model_name=MODEL, api_key="sk-secret")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}, {"Authorization": "Basic sk-secret"},
     {"Authorization": "Bearer "}],
)
async def test_missing_or_wrong_api_key_is_401(keyed_app: FastAPI, headers: dict[str, str]) -> None:
    async with asgi_client(keyed_app) as client:
        for path, body in ((CHAT, GOOD_CHAT), (COMPLETIONS, GOOD_COMPLETION)):
            response = await client.post(path, json=body, headers=headers)
            assert_openai_error(response, 401, code="invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        assert_openai_error(await client.get("/v1/models", headers=headers), 401)
        # Health stays open for probes; metrics and the API docs need the key (a scraper sends it).
        assert (await client.get("/health")).status_code == 200
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc", "/ping", "/version"):
            assert_openai_error(await client.get(path), 401)
        assert (await client.get("/metrics", headers={"Authorization": "Bearer sk-secret"})).status_code == 200
        response = await client.post(CHAT, json=GOOD_CHAT, headers={"Authorization": "Bearer sk-secret"})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected_text(4)
