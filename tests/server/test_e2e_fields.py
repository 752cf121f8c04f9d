"""Issue 21's fields through the official `openai` client against the real server (slow).

Each is checked by its effect on greedy outputs that `Engine.generate` computed in-process
(`references`); each error a client can cause is a 400 naming the field, and the next request
is served.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.e2e_support import CHATS, MAX_TOKENS, PROMPTS, References
from server.helpers import TOOL_CONVERSATION
from server.process import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def client(real_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture
def model(real_server: ServerProcess) -> str:
    return str(httpx.get(real_server.base_url + "/v1/models").json()["data"][0]["id"])


def greedy(client: openai.OpenAI, model: str, prompt: Any, **fields: Any) -> Any:
    extra = {
        k: fields.pop(k)
        for k in list(fields)
        if k not in ("n", "echo", "logit_bias", "stop", "max_tokens", "logprobs", "stream")
    }
    return client.completions.create(
        model=model,
        prompt=prompt,
        temperature=0,
        extra_body=extra or None,
        **{"max_tokens": MAX_TOKENS, **fields},
    )


def test_n_gives_n_choices_sharing_the_prompt(
    client: openai.OpenAI, model: str, references: References
) -> None:
    prompt = PROMPTS[0]
    text, num_tokens = references.completions[prompt]
    result = greedy(client, model, prompt, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.text for c in result.choices] == [text] * 3  # greedy: every choice is the reference
    one = greedy(client, model, prompt)
    assert result.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert result.usage.completion_tokens == 3 * num_tokens
    streamed: dict[int, str] = {}
    for chunk in greedy(client, model, prompt, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: text, 1: text, 2: text}
    sampled = client.chat.completions.create(
        model=model,
        messages=CHATS[0],
        n=4,
        temperature=1.0,
        seed=7,
        max_tokens=MAX_TOKENS,
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in sampled.choices}) > 1  # each choice samples on its own


def test_a_list_of_prompts_answers_each_in_order(
    client: openai.OpenAI, model: str, references: References
) -> None:
    result = greedy(client, model, PROMPTS, n=2)
    assert [c.index for c in result.choices] == list(range(2 * len(PROMPTS)))
    assert [c.text for c in result.choices] == [
        references.completions[p][0] for p in PROMPTS for _ in range(2)
    ]
    assert result.usage.completion_tokens == 2 * sum(references.completions[p][1] for p in PROMPTS)


def test_logit_bias_banning_the_greedy_token_changes_the_output(
    client: openai.OpenAI, model: str, references: References
) -> None:
    prompt = PROMPTS[1]
    first = references.token_ids[prompt][0]
    banned = greedy(client, model, prompt, logit_bias={str(first): -100})
    assert banned.choices[0].text != references.completions[prompt][0]
    favoured = greedy(client, model, prompt, logit_bias={str(first): 100}, max_tokens=4, logprobs=1)
    assert len(set(favoured.choices[0].logprobs.tokens)) == 1  # the favoured token over and over
    assert greedy(client, model, prompt).choices[0].text == references.completions[prompt][0]


def test_stop_token_ids_min_tokens_and_ignore_eos(
    client: openai.OpenAI, model: str, references: References
) -> None:
    prompt = PROMPTS[2]
    first = references.token_ids[prompt][0]
    stopped = greedy(client, model, prompt, stop_token_ids=[first])
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    held = greedy(client, model, prompt, stop_token_ids=[first], min_tokens=5)
    assert held.usage.completion_tokens >= 5  # the stop id cannot be sampled before 5 tokens
    # A chat the model ends itself (EOS) well before the limit, then the same with ignore_eos.
    ends = client.chat.completions.create(
        model=model, messages=CHATS[0], temperature=0, max_tokens=64
    )
    assert ends.choices[0].finish_reason == "stop" and ends.usage.completion_tokens < 64
    past = client.chat.completions.create(
        model=model,
        messages=CHATS[0],
        temperature=0,
        max_tokens=64,
        extra_body={"ignore_eos": True},
    )
    assert past.choices[0].finish_reason == "length" and past.usage.completion_tokens == 64
    longer = client.chat.completions.create(
        model=model,
        messages=CHATS[0],
        temperature=0,
        max_tokens=64,
        extra_body={"min_tokens": ends.usage.completion_tokens + 3},
    )
    assert longer.usage.completion_tokens >= ends.usage.completion_tokens + 3


def test_echo_and_include_stop_str_in_output(
    client: openai.OpenAI, model: str, references: References
) -> None:
    prompt = PROMPTS[0]
    text = references.completions[prompt][0]
    echoed = greedy(client, model, prompt, echo=True)
    assert echoed.choices[0].text == prompt + text
    scored = greedy(client, model, prompt, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and all(
        lp is not None for lp in logprobs.token_logprobs[1:]
    )
    assert "".join(logprobs.tokens) == prompt + text
    score = greedy(
        client, model, prompt, echo=True, logprobs=0, max_tokens=0
    )  # scoring the prompt alone
    assert score.choices[0].text == prompt and score.usage.completion_tokens == 0
    assert (
        score.choices[0].logprobs.token_logprobs
        == logprobs.token_logprobs[: score.usage.prompt_tokens]
    )
    stop = text.strip().split()[1]  # the second word of the greedy text
    cut = greedy(client, model, prompt, stop=[stop])
    kept = greedy(client, model, prompt, stop=[stop], include_stop_str_in_output=True)
    assert cut.choices[0].finish_reason == kept.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == cut.choices[0].text + stop and text.startswith(
        kept.choices[0].text
    )


def test_prompt_logprobs_and_chat_template_options(client: openai.OpenAI, model: str) -> None:
    result = greedy(client, model, PROMPTS[0], prompt_logprobs=2, max_tokens=2)
    prompt_logprobs = result.choices[0].model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == result.usage.prompt_tokens and prompt_logprobs[0] is None
    for position in prompt_logprobs[1:]:
        assert 2 <= len(position) <= 3  # the prompt's token and the top 2
        assert all(v["logprob"] <= 0 and v["decoded_token"] is not None for v in position.values())
    messages: Any = CHATS[1]
    base = client.chat.completions.create(
        model=model, messages=messages, max_tokens=2, temperature=0
    )
    no_turn = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=2,
        temperature=0,
        extra_body={"chat_template_kwargs": {"add_generation_prompt": False}},
    )
    assert no_turn.usage.prompt_tokens < base.usage.prompt_tokens
    prefill = [*messages, {"role": "assistant", "content": "My favourite colour is"}]
    cont = client.chat.completions.create(
        model=model,
        messages=prefill,
        max_tokens=3,
        temperature=0,
        extra_body={"continue_final_message": True, "echo": True},
    )
    assert cont.choices[0].message.content.startswith("My favourite colour is")
    answered = client.chat.completions.create(
        model=model,
        messages=TOOL_CONVERSATION,
        max_tokens=3,
        temperature=0,
        parallel_tool_calls=False,
    )
    assert answered.choices[0].message.content and answered.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (
            lambda c, m: c.completions.create(
                model=m, prompt="x", max_tokens=2, logit_bias={"abc": 5}
            ),
            "logit_bias",
        ),
        (
            lambda c, m: c.completions.create(
                model=m, prompt="x", max_tokens=2, logit_bias={"99999999": 5}
            ),
            "logit_bias",
        ),
        (
            lambda c, m: c.chat.completions.create(
                model=m,
                max_tokens=2,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                        ],
                    }
                ],
            ),
            "messages",
        ),
        (lambda c, m: c.completions.create(model=m, prompt="x", max_tokens=2, n=0), "n"),
        (lambda c, m: c.completions.create(model=m, prompt="x", max_tokens=2, n=129), "n"),
        (lambda c, m: c.completions.create(model=m, prompt=["x"] * 1025, max_tokens=2), "prompt"),
        (
            lambda c, m: c.completions.create(model=m, prompt=["x", "y" * 4000], max_tokens=2),
            "prompt",
        ),
        (
            lambda c, m: c.completions.create(
                model=m, prompt="x", max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1}
            ),
            "prompt_logprobs",
        ),
        (
            lambda c, m: c.completions.create(
                model=m, prompt="x", max_tokens=2, extra_body={"min_tokens": 3}
            ),
            "min_tokens",
        ),
        (
            lambda c, m: c.chat.completions.create(
                model=m,
                max_tokens=2,
                messages=[{"role": "user", "content": "x"}],
                extra_body={"chat_template_kwargs": {"tokenize": True}},
            ),
            "chat_template_kwargs",
        ),
    ],
)
def test_each_user_error_is_a_400_naming_the_field_then_the_next_request_is_served(
    client: openai.OpenAI, model: str, references: References, call: Any, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        call(client, model)
    assert error.value.body["param"] == param, error.value.body
    assert (
        greedy(client, model, PROMPTS[0]).choices[0].text == references.completions[PROMPTS[0]][0]
    )
