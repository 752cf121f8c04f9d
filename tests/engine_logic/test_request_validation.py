"""SamplingParams and validate_request: each bad input gets its own error naming the field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shardline.engine.errors import InvalidRequestError, PromptTooLongError, ShardlineError
from shardline.engine.request import Request, SamplingParams, validate_request
from shardline.transport.messages import SamplingOptions


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -1),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("seed", 1.5),
        ("seed", "7"),
        ("stop", [""]),
        ("stop", [1]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", "abc"),
        ("ignore_eos", 1),
        ("logprobs", -1),
        ("logprobs", 1.5),  # the upper cap is the engine's (EngineConfig.max_logprobs): test_cli_vllm
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("n", 129),
        ("n", 0),
        ("n", 2.0),
        ("skip_special_tokens", "yes"),
        ("include_stop_str_in_output", 1),
        ("timeout", 0),
        ("timeout", -1.0),
    ],
)
def test_each_bad_parameter_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ShardlineError)


def test_n_error_names_the_bound() -> None:
    assert SamplingParams(n=3).n == 3
    with pytest.raises(InvalidRequestError, match=r"n.*\[1, 128\]"):
        SamplingParams(n=129)


def test_lists_are_normalized_to_tuples() -> None:
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4])
    assert params.stop == ("a", "b")
    assert params.stop_token_ids == (3, 4)
    assert SamplingParams(stop="###").stop == ("###",)
    hash(params)  # frozen and hashable once normalized


def test_good_edge_values_are_accepted() -> None:
    params = SamplingParams(
        max_tokens=1,
        temperature=0,
        top_k=0,
        top_p=1.0,
        min_p=1.0,
        seed=0,
        logprobs=20,
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=0.01,
        timeout=0.5,
    )
    assert params.greedy


def test_to_options_is_the_worker_subset() -> None:
    params = SamplingParams(
        temperature=0.7, top_k=0, top_p=0.9, min_p=0.05, seed=3, logprobs=2, presence_penalty=0.5
    )
    options = params.to_options()
    assert options == SamplingOptions(
        temperature=0.7,
        top_k=-1,  # 0 means off, the wire form of off is -1
        top_p=0.9,
        min_p=0.05,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        num_logprobs=2,
    )
    assert SamplingParams(top_k=5).to_options().top_k == 5


def check(prompt: list[int], params: SamplingParams | None = None) -> None:
    validate_request(prompt, params or SamplingParams(), max_model_len=32, vocab_size=100)


def test_validate_request_accepts_a_fitting_request() -> None:
    check([1, 2, 3], SamplingParams(max_tokens=29))


def test_empty_prompt() -> None:
    with pytest.raises(InvalidRequestError) as info:
        check([])
    assert info.value.field == "prompt" and "empty" in str(info.value)


@pytest.mark.parametrize("token_id", [-1, 100, 10**9])
def test_prompt_token_out_of_vocab(token_id: int) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check([1, token_id])
    assert info.value.field == "prompt" and str(token_id) in str(info.value)


def test_prompt_longer_than_context() -> None:
    with pytest.raises(PromptTooLongError) as info:
        check(list(range(32)), SamplingParams(max_tokens=1))
    assert info.value.field == "prompt"
    assert "32" in str(info.value)


def test_prompt_plus_max_tokens_longer_than_context() -> None:
    with pytest.raises(PromptTooLongError) as info:
        check(list(range(20)), SamplingParams(max_tokens=13))
    message = str(info.value)
    assert "20" in message and "13" in message and "at most 12" in message


def test_unknown_stop_token_id() -> None:
    with pytest.raises(InvalidRequestError) as info:
        check([1], SamplingParams(stop_token_ids=[100]))
    assert info.value.field == "stop_token_ids"


def test_request_token_accounting() -> None:
    request = Request("r", [5, 6, 7], SamplingParams(), eos_token_ids=[2], arrival_time=1.0)
    request.output_token_ids += [8, 9]
    assert request.all_token_ids == [5, 6, 7, 8, 9]
    assert (request.num_prompt_tokens, request.num_output_tokens, request.num_tokens) == (3, 2, 5)
    assert not request.is_finished
