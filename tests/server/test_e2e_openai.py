"""The real server process, talked to with the official `openai` package (slow).

Greedy answers must equal what `Engine.generate` / `Engine.chat` return for the same request.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from server.e2e_support import CHATS, MAX_MODEL_LEN, MAX_TOKENS, PROMPTS, References
from server.process import ServerProcess

pytestmark = pytest.mark.slow


def _model(server: ServerProcess) -> str:
    return httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]


def test_sync_completions_match_engine(real_server: ServerProcess, references: References) -> None:
    client = openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="none")
    model = _model(real_server)
    for prompt in PROMPTS:
        result = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        text, num_tokens = references.completions[prompt]
        assert result.choices[0].text == text
        assert result.usage is not None and result.usage.completion_tokens == num_tokens
        streamed = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == text


def test_sync_chat_matches_engine(real_server: ServerProcess, references: References) -> None:
    client = openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="none")
    model = _model(real_server)
    for messages, (text, num_tokens) in zip(CHATS, references.chats, strict=True):
        result = client.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                max_tokens=MAX_TOKENS, temperature=0)
        assert result.choices[0].message.content == text
        assert result.usage is not None and result.usage.completion_tokens == num_tokens


async def test_async_streaming_chat_and_completions_match_engine(
    real_server: ServerProcess, references: References
) -> None:
    model = _model(real_server)
    async with openai.AsyncOpenAI(base_url=real_server.base_url + "/v1", api_key="none") as client:
        for messages, (text, num_tokens) in zip(CHATS, references.chats, strict=True):
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,  # type: ignore[arg-type]
                stream=True, stream_options={"include_usage": True},
            )
            pieces, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                if chunk.usage is not None:
                    usage = chunk.usage
            assert "".join(pieces) == text
            assert usage is not None and usage.completion_tokens == num_tokens
        prompt = PROMPTS[0]
        result = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert result.choices[0].text == references.completions[prompt][0]


def test_errors_from_the_real_server_then_success(real_server: ServerProcess, references: References) -> None:
    client = openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="none", max_retries=0)
    model = _model(real_server)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert not_found.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=model, prompt="word " * (MAX_MODEL_LEN * 2), max_tokens=2)
    assert too_long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad_param:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert bad_param.value.body["param"] == "temperature"  # type: ignore[index]
    prompt = PROMPTS[1]
    result = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert result.choices[0].text == references.completions[prompt][0]
