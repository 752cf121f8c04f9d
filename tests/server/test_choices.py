"""Several choices per request (issue 21 item 2): `n`, lists of prompts with OpenAI's choice
indexing, `echo`, prompt logprobs, and chat messages with tool calls or content parts, against
the fake engine (choice j continues CONTINUATION from its j-th character)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import anyio
import httpx
import pytest

from server.conftest import MODEL
from server.fake_engine import CONTINUATION, FakeEngine, expected_text
from server.helpers import TOOL_CONVERSATION, assert_openai_error, parse_sse, uvicorn_server
from shardline.engine.server import build_app
from support.waiting import wait_until

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def continuation(choice: int, num_tokens: int) -> str:
    """The fake's text for choice `choice` (of its prompt) after `num_tokens` tokens."""
    return "".join(CONTINUATION[(i + choice) % len(CONTINUATION)] for i in range(num_tokens))


def streamed_texts(events: list[Any], key: str) -> dict[int, str]:
    texts: dict[int, str] = defaultdict(str)
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] += (
                (choice["delta"].get("content") or "") if key == "delta" else choice["text"]
            )
    return dict(texts)


async def test_a_list_of_prompts_numbers_choices_prompt_by_prompt(
    client: httpx.AsyncClient,
) -> None:
    prompts: list[Any] = ["ab", "xyz", "wxyz"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 5, "n": 2}
    response = await client.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    # OpenAI's order: prompt 0's two choices, then prompt 1's, ... (index = prompt * n + j).
    assert [c["index"] for c in result["choices"]] == list(range(6))
    assert [c["text"] for c in result["choices"]] == [
        continuation(j, 5) for _ in prompts for j in range(2)
    ]
    # Each prompt counted once (2 + 3 + 4 tokens), every choice's tokens summed.
    assert result["usage"] == {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}
    streamed = parse_sse(
        (
            await client.post(
                COMPLETIONS,
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
        ).text
    )
    assert streamed[-1] == "[DONE]" and streamed[-2]["usage"] == result["usage"]
    assert streamed_texts(streamed[:-1], "text") == {
        c["index"]: c["text"] for c in result["choices"]
    }
    finishes = [c for e in streamed[:-2] for c in e["choices"] if c["finish_reason"] is not None]
    assert sorted(c["index"] for c in finishes) == list(range(6))


async def test_a_list_of_prompts_runs_them_as_separate_engine_requests(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    response = await client.post(COMPLETIONS, json={"prompt": ["a", "bbbb"], "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert [c["text"] for c in response.json()["choices"]] == [expected_text(3)] * 2
    assert len(fake_engine.params_seen) == 2 and all(
        p.max_tokens == 3 for p in fake_engine.params_seen
    )
    # Without max_tokens each prompt runs to the end of the context from its own length.
    fake_engine.params_seen.clear()
    response = await client.post(
        COMPLETIONS, json={"prompt": ["a", "bbbb"], "max_tokens": None, "n": 1}
    )
    assert [c["finish_reason"] for c in response.json()["choices"]] == ["length", "length"]
    assert sorted(p.max_tokens for p in fake_engine.params_seen) == [
        fake_engine.max_model_len - 4,
        fake_engine.max_model_len - 1,
    ]


async def test_chat_n_streams_each_choice_under_its_index(client: httpx.AsyncClient) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 4,
        "n": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = parse_sse((await client.post(CHAT, json=body)).text)
    # The role comes first, once per choice, as OpenAI sends it.
    assert [e["choices"][0] for e in events[:3]] == [
        {
            "index": j,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        for j in range(3)
    ]
    assert streamed_texts(events[3:-1], "delta") == {j: continuation(j, 4) for j in range(3)}
    prompt_tokens = len(FakeEngine().tokenizer.apply_chat_template(MESSAGES))
    assert events[-2]["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }
    whole = (await client.post(CHAT, json={**body, "stream": False})).json()
    assert [c["message"]["content"] for c in whole["choices"]] == [
        continuation(j, 4) for j in range(3)
    ]
    assert whole["usage"] == events[-2]["usage"]


async def test_echo_puts_the_prompt_first(client: httpx.AsyncClient) -> None:
    for prompt, shown in (("Say: ", "Say: "), ([72, 105, 33], "Hi!")):
        body = {"prompt": [prompt, prompt], "max_tokens": 3, "echo": True, "n": 2}
        whole = (await client.post(COMPLETIONS, json=body)).json()
        assert [c["text"] for c in whole["choices"]] == [
            shown + continuation(j, 3) for _ in range(2) for j in range(2)
        ]
        events = parse_sse((await client.post(COMPLETIONS, json={**body, "stream": True})).text)
        assert streamed_texts(events, "text") == {c["index"]: c["text"] for c in whole["choices"]}


async def test_echo_with_logprobs_lists_the_prompt_tokens_first(client: httpx.AsyncClient) -> None:
    body = {"prompt": "abc", "max_tokens": 4, "echo": True, "logprobs": 1}
    choice = (await client.post(COMPLETIONS, json=body)).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == "abc" + expected_text(4)
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -0.5, -0.5, -0.5, -0.5]
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {"a": -0.25}
    assert logprobs["text_offset"] == list(range(7))
    assert "prompt_logprobs" not in choice  # only when asked for by name
    events = parse_sse((await client.post(COMPLETIONS, json={**body, "stream": True})).text)
    pieces = [e["choices"][0]["logprobs"] for e in events[:-1]]
    assert [t for p in pieces for t in p["token_logprobs"]] == logprobs["token_logprobs"]
    assert [o for p in pieces for o in p["text_offset"]] == logprobs["text_offset"]


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_max_tokens_0_scores_the_prompt(
    client: httpx.AsyncClient, stream: bool
) -> None:
    body = {
        "prompt": ["abc", "wxyz"],
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    response = await client.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    if stream:
        events = parse_sse(response.text)
        choices = [c for e in events[:-2] for c in e["choices"]]
        usage = events[-2]["usage"]
    else:
        choices, usage = response.json()["choices"], response.json()["usage"]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in choices] == [
        (0, "abc", "length"),
        (1, "wxyz", "length"),
    ]
    assert [c["logprobs"]["token_logprobs"] for c in choices] == [
        [None, -1.0, -1.0],
        [None, -1.0, -1.0, -1.0],
    ]
    assert usage == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}


async def test_prompt_logprobs_in_vllm_shape(client: httpx.AsyncClient) -> None:
    chat = (
        await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 1})
    ).json()
    prompt_ids = FakeEngine().tokenizer.apply_chat_template(MESSAGES)
    logprobs = chat["prompt_logprobs"]  # on the response for chat, as vLLM
    assert len(logprobs) == len(prompt_ids) and logprobs[0] is None
    for token_id, entry in zip(prompt_ids[1:], logprobs[1:], strict=True):
        assert entry[str(token_id)]["logprob"] == -1.0
        assert entry[str(token_id)]["decoded_token"] == chr(token_id)
        assert entry["97"]["rank"] == 1 or token_id == 97
    plain = (await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2})).json()
    assert "prompt_logprobs" not in plain


async def test_tool_messages_reach_the_template(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    messages = TOOL_CONVERSATION
    response = await client.post(
        CHAT, json={"messages": messages, "max_tokens": 2, "parallel_tool_calls": False}
    )
    assert response.status_code == 200, response.text
    rendered = fake_engine.tokenizer.render_chat(
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": {"city": "Oslo"}},
                    }
                ],
            },
            {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"},
        ]
    )
    assert '<call weather({"city": "Oslo"})>' in rendered and "<for call_1>" in rendered
    assert response.json()["usage"]["prompt_tokens"] == len(rendered.encode())


async def test_text_parts_are_joined_with_newlines_as_vllm_joins_them(
    client: httpx.AsyncClient,
) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    response = await client.post(
        CHAT, json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    )
    assert response.json()["usage"]["prompt_tokens"] == len("<user>one\ntwo\n<assistant>")


async def test_chat_echo_repeats_the_last_message_of_the_replys_role(
    client: httpx.AsyncClient,
) -> None:
    prefill = [*MESSAGES, {"role": "assistant", "content": "Sure:"}]
    body = {"messages": prefill, "max_tokens": 3, "echo": True, "continue_final_message": True}
    whole = (await client.post(CHAT, json=body)).json()
    assert whole["choices"][0]["message"]["content"] == "Sure:" + expected_text(3)
    events = parse_sse((await client.post(CHAT, json={**body, "stream": True})).text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Sure:"}
    # The last message is the user's: nothing to echo for an assistant reply.
    plain = (
        await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3, "echo": True})
    ).json()
    assert plain["choices"][0]["message"]["content"] == expected_text(3)


async def test_an_error_in_one_prompt_of_a_list_names_it_and_nothing_runs(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    response = await client.post(
        COMPLETIONS, json={"prompt": [[65, 66], [65, 999]], "max_tokens": 2}
    )
    error = assert_openai_error(response, 400, param="prompt")
    assert error["message"].startswith("prompt 1: ") and "999" in error["message"]
    await wait_until(lambda: fake_engine.stats().num_running == 0)  # prompt 0's request is aborted
    too_long = await client.post(COMPLETIONS, json={"prompt": ["a", "b" * 200], "max_tokens": 100})
    error = assert_openai_error(too_long, 400, param="max_tokens", code="context_length_exceeded")
    assert error["message"].startswith("prompt 1: ")
    await wait_until(lambda: fake_engine.stats().num_running == 0)
    ok = await client.post(COMPLETIONS, json={"prompt": ["a", "b"], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_hanging_up_aborts_every_prompt_and_choice(stream: bool) -> None:
    slow_engine = FakeEngine(max_model_len=4096, token_delay=0.02)  # 20 ms a token
    body = {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2000, "stream": stream}
    app = build_app(slow_engine, served_model_name=MODEL, api_key=None)
    async with uvicorn_server(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client, anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.post(COMPLETIONS, json=body))
            await wait_until(lambda: slow_engine.stats().num_running == 3)
            tg.cancel_scope.cancel()  # the client gives up: its connection closes
        # 2000 tokens at 20 ms each would take 40 s: only an abort ends all six choices this soon.
        await wait_until(lambda: slow_engine.stats().requests_finished.get("abort") == 6)
        assert slow_engine.stats().num_running == 0
        async with httpx.AsyncClient(base_url=base_url) as client:
            response = await client.post(
                COMPLETIONS, json={**body, "max_tokens": 2, "stream": False}
            )
            assert [c["text"] for c in response.json()["choices"]] == [
                continuation(j, 2) for _ in range(3) for j in range(2)
            ]
