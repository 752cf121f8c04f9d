"""Shared pieces of the server tests: clients, an in-loop uvicorn, error and SSE checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI

# A conversation with a tool call (null content, JSON arguments) and the tool's answer.
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
]


def assert_openai_error(
    response: httpx.Response, status: int, *, type: str | None = None, param: str | None = ..., code: str | None = ...
) -> dict[str, Any]:
    """The response has `status` and OpenAI's error body; returns the inner error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if type is not None:
        assert error["type"] == type, error
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]


def parse_sse(text: str) -> list[Any]:
    """Events of a server-sent-event body: decoded JSON objects, then the string "[DONE]"."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data line: {block!r}"
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def asgi_client(app: FastAPI, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """A client that calls the app in-process (no sockets)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers)


@asynccontextmanager
async def running_uvicorn(config: uvicorn.Config) -> AsyncIterator[tuple[uvicorn.Server, int]]:
    """Run a uvicorn server for `config` in this event loop; yields it and its port."""
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(30):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield server, port
        finally:
            server.should_exit = True


@asynccontextmanager
async def uvicorn_server(app: FastAPI) -> AsyncIterator[str]:
    """Serve `app` with uvicorn in this event loop on a free port; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none", lifespan="off")
    async with running_uvicorn(config) as (_, port):
        yield f"http://127.0.0.1:{port}"


def check_response(response: Any) -> None:
    """A fuzzed request's answer: no 5xx, and every error in OpenAI's shape."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
