"""No silent drops (issue 21, item 1): every field OpenAI or vLLM defines is honoured or
refused with a 400 naming it; OpenAI's metadata fields are accepted; a field neither defines is
accepted and logged once. Each refusal is followed by a served request."""

from __future__ import annotations

import logging

import httpx
import pytest

from server.conftest import MODEL
from server.fake_engine import FakeEngine, expected_text
from shardline.engine.server import sampling
from shardline.engine.server.protocol import ChatCompletionRequest, CompletionRequest

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ASKING = {  # a value that asks for something, per field shardline does not honour yet
    "functions": [{"name": "f"}], "function_call": "auto", "use_beam_search": True, "bad_words": ["x"], "allowed_token_ids": [1],
    "chat_template": "{{ 1 }}", "priority": 3, "reasoning_effort": "low", "documents": [{"text": "x"}],
    "verbosity": "low", "request_id": "my-id", "return_token_ids": True, "thinking_token_budget": 10,
    "include_reasoning": False, "logprob_token_ids": [5],
}


@pytest.mark.parametrize("field", sorted(ASKING))
async def test_a_field_not_honoured_yet_is_refused_by_name(client: httpx.AsyncClient, field: str) -> None:
    assert field in sampling.UNSUPPORTED_FIELDS
    r = await client.post("/v1/chat/completions", json={**CHAT, field: ASKING[field]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["code"] == "unsupported_parameter"
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize(("field", "value"), [
    ("logit_bias", None), ("logit_bias", {}), ("tools", []), ("response_format", {"type": "text"}),
    ("tool_choice", "none"), ("add_generation_prompt", True), ("min_tokens", 0),
    ("user", "u-1"), ("store", True), ("metadata", {"k": "v"}), ("service_tier", "auto"),
    ("parallel_tool_calls", True), ("parallel_tool_calls", False), ("prompt_cache_key", "k-1"),
    ("safety_identifier", "s-1"), ("session_id", "chat-9"), ("include_reasoning", True),
    ("thinking_token_budget", -1),
])
async def test_asking_nothing_and_metadata_are_accepted(client: httpx.AsyncClient, field: str, value: object) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert r.status_code == 200, r.text


async def test_an_unknown_field_is_accepted_and_logged_once(client: httpx.AsyncClient,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shardline.serve"):
        for _ in range(3):
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                           "my_own_field_xyz": 1})
            assert r.status_code == 200
    assert caplog.text.count("my_own_field_xyz") == 1


def test_vllm_fields_the_engine_honours_reach_it() -> None:
    for req in (ChatCompletionRequest(**CHAT, ignore_eos=True, stop_token_ids=[7, 9], skip_special_tokens=False),
                CompletionRequest(model=MODEL, prompt="x", max_tokens=3, ignore_eos=True, stop_token_ids=[7, 9],
                                  skip_special_tokens=False)):
        params = sampling.build_sampling_params(req, num_prompt_tokens=None, max_model_len=64)
        assert params.ignore_eos is True and params.stop_token_ids == (7, 9) and params.skip_special_tokens is False


# Every field issue 21 asks to honour, with a request that uses it and a check of its effect on
# the fake engine (tests/server/fake_engine.py: choice j continues CONTINUATION from j, the chat
# template shows its variables as "[name=value]", prompt logprobs are -1.0 with top ids 97...).
COMPLETION = {"model": MODEL, "prompt": "abc", "max_tokens": 4}
HONOURED: dict[str, tuple[str, dict[str, object]]] = {
    "n": ("/v1/chat/completions", {**CHAT, "n": 3}),
    "logit_bias": ("/v1/chat/completions", {**CHAT, "logit_bias": {"65": 5, "66": -100}}),
    "min_tokens": ("/v1/chat/completions", {**CHAT, "max_tokens": 40, "stop": ["h"], "min_tokens": 3}),
    "include_stop_str_in_output": ("/v1/chat/completions",
                                   {**CHAT, "max_tokens": 20, "stop": ["quick"], "include_stop_str_in_output": True}),
    "prompt_logprobs": ("/v1/completions", {**COMPLETION, "prompt_logprobs": 2}),
    "echo": ("/v1/completions", {**COMPLETION, "echo": True}),
    "chat_template_kwargs": ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"flavour": "mint"}}),
    "add_generation_prompt": ("/v1/chat/completions", {**CHAT, "add_generation_prompt": False}),
    "continue_final_message": ("/v1/chat/completions", {**CHAT, "continue_final_message": True, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}]}),
    "ignore_eos": ("/v1/completions", {**COMPLETION, "ignore_eos": True}),
    "stop_token_ids": ("/v1/completions", {**COMPLETION, "stop_token_ids": [7]}),
    "skip_special_tokens": ("/v1/completions", {**COMPLETION, "skip_special_tokens": False}),
    "max_completion_tokens": ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2}),
}


def _check_effect(field: str, body: dict[str, object], engine: FakeEngine) -> None:
    params = engine.last_params
    assert params is not None
    if field == "n":
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]  # type: ignore[index]
        assert [c["message"]["content"] for c in body["choices"]] == ["The", "he ", "e q"]  # type: ignore[index]
    elif field == "logit_bias":
        assert dict(params.logit_bias) == {65: 5.0, 66: -100.0}
    elif field in ("min_tokens", "include_stop_str_in_output"):
        want = {"min_tokens": "The quick brown fox jumps over t", "include_stop_str_in_output": "The quick"}[field]
        assert body["choices"][0]["message"]["content"] == want  # type: ignore[index]
    elif field == "prompt_logprobs":
        logprobs = body["choices"][0]["prompt_logprobs"]  # type: ignore[index]
        assert logprobs[0] is None and len(logprobs) == 3
        assert logprobs[1] == {"98": {"logprob": -1.0, "rank": 2, "decoded_token": "b"},  # "b" is 2nd of the top
                               "97": {"logprob": -0.25, "rank": 1, "decoded_token": "a"}}
    elif field == "echo":
        assert body["choices"][0]["text"] == "abc" + expected_text(4)  # type: ignore[index]
    elif field in ("chat_template_kwargs", "add_generation_prompt", "continue_final_message"):
        messages = [{"role": "user", "content": "hi"}]
        options: dict[str, object] = {
            "chat_template_kwargs": {"flavour": "mint"}, "add_generation_prompt": {"add_generation_prompt": False},
            "continue_final_message": {"continue_final_message": True, "add_generation_prompt": False},
        }[field]
        if field == "continue_final_message":
            messages = [*messages, {"role": "assistant", "content": "Sure:"}]
        rendered = engine.tokenizer.render_chat(messages, **options)  # type: ignore[arg-type]
        assert body["usage"]["prompt_tokens"] == len(rendered.encode())  # type: ignore[index]
    elif field == "max_completion_tokens":
        assert params.max_tokens == 2
    else:
        assert getattr(params, field) == {"ignore_eos": True, "stop_token_ids": (7,), "skip_special_tokens": False}[field]


def test_the_field_walk_covers_what_issue_21_lists() -> None:
    """Each field is honoured (declared, so it reaches the engine) or refused (listed)."""
    for field in HONOURED:
        assert field not in sampling.UNSUPPORTED_FIELDS, field
        assert field in ChatCompletionRequest.model_fields or field in CompletionRequest.model_fields, field
    for field in ASKING:
        assert field in sampling.UNSUPPORTED_FIELDS, field
        assert field not in ChatCompletionRequest.model_fields and field not in CompletionRequest.model_fields


@pytest.mark.parametrize("field", sorted(HONOURED))
async def test_a_field_issue_21_lists_is_honoured_by_its_effect(client: httpx.AsyncClient, fake_engine: FakeEngine,
                                                                 field: str) -> None:
    path, request = HONOURED[field]
    r = await client.post(path, json=request)
    assert r.status_code == 200, r.text
    _check_effect(field, r.json(), fake_engine)
