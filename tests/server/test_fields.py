"""No silent drops (issue 21, item 1): every field OpenAI or vLLM defines is honoured or
refused with a 400 naming it; OpenAI's metadata fields are accepted; a field neither defines is
accepted and logged once. Each refusal is followed by a served request."""

from __future__ import annotations

import logging

import httpx
import pytest

from server.conftest import MODEL
from shardline.engine.server import sampling
from shardline.engine.server.protocol import ChatCompletionRequest, CompletionRequest

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ASKING = {  # a value that asks for something, per field shardline does not honour yet
    "logit_bias": {"5": -100}, "min_tokens": 2, "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
    "prompt_logprobs": 1, "include_stop_str_in_output": True, "guided_json": {"type": "object"},
    "guided_regex": "a+", "guided_choice": ["a"], "structured_outputs": {"json": {}},
    "use_beam_search": True, "bad_words": ["x"], "allowed_token_ids": [1], "echo": True,
    "chat_template": "{{ 1 }}", "chat_template_kwargs": {"enable_thinking": False},
    "add_generation_prompt": False, "priority": 3, "reasoning_effort": "low",
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
    ("parallel_tool_calls", True),
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
