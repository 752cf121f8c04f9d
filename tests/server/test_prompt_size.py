"""Large prompts never reach the tokenizer on the event loop (issue 20 item 4, server side).

A prompt longer than the engine's `max_prompt_chars` (or with more token ids than the
context) is refused from its size, unread; a long one that may fit is counted (for the
default `max_tokens`) on a worker thread; a request that sets its own limit is not counted at
all. The tokenizer here records every text it was given and on which thread.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from server.conftest import MODEL
from server.fake_engine import ByteTokenizer, FakeEngine, expected_text
from server.helpers import asgi_client, assert_openai_error
from shardline.engine.server import build_app
from shardline.engine.server.sampling import TOKENIZE_OFF_LOOP_CHARS

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LONG = TOKENIZE_OFF_LOOP_CHARS + 4000  # long enough to go to a thread


class RecordingTokenizer(ByteTokenizer):
    """ByteTokenizer noting (characters, on the event loop's thread?) for each text it reads."""

    def __init__(self, loop_thread: int) -> None:
        self.loop_thread = loop_thread
        self.seen: list[tuple[int, bool]] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.seen.append((len(text), threading.get_ident() == self.loop_thread))
        return super().encode(text)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = True
    ) -> list[int]:
        self.seen.append((sum(len(m["content"]) for m in messages), threading.get_ident() == self.loop_thread))
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return ByteTokenizer.encode(self, text)

    def reads_of(self, chars: int) -> list[bool]:
        """For each read of a text of at least `chars` characters: was it on the loop?"""
        return [on_loop for n, on_loop in self.seen if n >= chars]


async def _client(max_model_len: int) -> tuple[FakeEngine, RecordingTokenizer, httpx.AsyncClient]:
    engine = FakeEngine(max_model_len=max_model_len)
    tokenizer = RecordingTokenizer(threading.get_ident())
    engine.tokenizer = tokenizer
    app = build_app(engine, served_model_name=MODEL, api_key=None, max_body_bytes=8 << 20)
    return engine, tokenizer, asgi_client(app)


@pytest.fixture
async def small() -> AsyncIterator[tuple[FakeEngine, RecordingTokenizer, httpx.AsyncClient]]:
    engine, tokenizer, client = await _client(max_model_len=256)
    async with client:
        yield engine, tokenizer, client


def _chat(*contents: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": c} for c in contents], **extra}


@pytest.mark.parametrize("limit", [{}, {"max_tokens": 4}], ids=["default-limit", "max_tokens"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_too_long_to_fit_is_refused_unread(
    small: tuple[FakeEngine, RecordingTokenizer, httpx.AsyncClient], limit: dict[str, int], stream: bool
) -> None:
    engine, tokenizer, client = small
    huge = "a" * 3_000_000
    refused: list[tuple[str, dict[str, Any], str]] = [
        (COMPLETIONS, {"prompt": huge}, "prompt"),
        (COMPLETIONS, {"prompt": [huge]}, "prompt"),
        (CHAT, _chat(huge), "messages"),
        (CHAT, _chat("a" * 200, "b" * 100), "messages"),  # together over the bound
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 300}]}]}, "messages"),
        (COMPLETIONS, {"prompt": [65] * engine.max_model_len}, "prompt"),  # ids: no room to generate
        (COMPLETIONS, {"prompt": [[65] * 100_000]}, "prompt"),
    ]
    for path, body, field in refused:
        response = await client.post(path, json={**body, **limit, "stream": stream})
        error = assert_openai_error(response, 400, param=field, code="context_length_exceeded")
        assert error["message"].startswith(f"invalid {field}: the prompt has "), error
    assert tokenizer.reads_of(200) == [], "a prompt that cannot fit was tokenized"
    assert engine.stats().prompt_tokens == 0  # nothing reached the engine either
    response = await client.post(COMPLETIONS, json={"prompt": "hello", "max_tokens": 5})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected_text(5)


async def test_a_long_prompt_that_may_fit_is_counted_on_a_thread() -> None:
    prompt = "ab" * (LONG // 2)
    engine, tokenizer, client = await _client(max_model_len=LONG + 30)
    async with client:
        # No max_tokens: the default (the rest of the context) needs the prompt's length.
        response = await client.post(COMPLETIONS, json={"prompt": prompt})
        assert response.status_code == 200, response.text
        assert response.json()["usage"] == {"prompt_tokens": LONG, "completion_tokens": 30, "total_tokens": LONG + 30}
        # The server's count ran on a thread (the fake engine's own encode is the one on the loop).
        assert tokenizer.reads_of(LONG) == [False, True]

        tokenizer.seen.clear()
        response = await client.post(CHAT, json=_chat(prompt, stream=True))
        assert response.status_code == 200, response.text
        assert tokenizer.reads_of(LONG) == [False, True]

        # A short prompt is counted in place: a thread hop would cost more than the count.
        tokenizer.seen.clear()
        response = await client.post(COMPLETIONS, json={"prompt": "hello"})
        assert response.status_code == 200, response.text
        assert tokenizer.reads_of(5) == [True, True]


async def test_a_request_with_its_own_limit_is_not_counted_by_the_server() -> None:
    engine, tokenizer, client = await _client(max_model_len=LONG + 30)
    async with client:
        for path, body in ((COMPLETIONS, {"prompt": "x" * LONG}), (CHAT, _chat("x" * LONG))):
            tokenizer.seen.clear()
            response = await client.post(path, json={**body, "max_tokens": 3})
            assert response.status_code == 200, response.text
            assert tokenizer.reads_of(LONG) == [True]  # the (fake) engine's, nobody else's
        # Over the context only with its limit: the field named is the limit, found by counting then.
        response = await client.post(COMPLETIONS, json={"prompt": "x" * LONG, "max_tokens": 31})
        assert_openai_error(response, 400, param="max_tokens", code="context_length_exceeded")

