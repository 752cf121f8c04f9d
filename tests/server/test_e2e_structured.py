"""Structured output and tool calling with the default model (SmolLM2-135M-Instruct) over HTTP,
through the official `openai` client (issue 22, Must show): the engine runs in-process behind the
server's app, served by uvicorn on a local port.

At temperature 1.0 with several seeds: every JSON output that ends with "stop" parses and
validates with `jsonschema` (streamed too); regex and choice outputs match; `required` and named
tool calls validate against their function's parameters; streamed calls reassemble into the
non-streamed call of the same seed; a tool result round trip gets a final answer. A bad schema
and an unsupported feature are 400s naming the field, and the next request is served.

Kept short for the default suite (a subset of tests/support/json_schemas.py); the sweep of every
schema x 4 seeds through HTTP is `slow`.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
import pytest_asyncio
import uvicorn

from shardline.engine.server import build_app
from support.json_schemas import SCHEMAS

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "smollm2"
SCHEMA_BY_NAME = dict(SCHEMAS)
SUBSET = ["nested_objects", "integer_bounds", "any_of", "ref_defs"]
MAX_TOKENS = 300  # room for the 135M model inside unbounded parts of a schema
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def oai(smollm2_dir: pathlib.Path) -> AsyncIterator[openai.AsyncOpenAI]:
    """The server on the default model, shared by the module (a fixture's teardown runs in
    another task than its setup, so uvicorn runs as a plain task here, not in a task group)."""
    from shardline.engine import Engine, EngineConfig

    config = EngineConfig(model=str(smollm2_dir), max_model_len=1024, num_kv_blocks=1024)
    async with await Engine.start(config) as engine:
        app = build_app(engine, served_model_name=MODEL, api_key=None)
        server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=0, log_level="warning", ws="none", lifespan="off"
            )
        )
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                assert not task.done(), task
                await asyncio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0
            ) as client:
                yield client
        finally:
            server.should_exit = True
            await task


def schema_messages(name: str, schema: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You answer with JSON only, short and compact."},
        {
            "role": "user",
            "content": f"Give a short example of '{name}' as JSON matching {json.dumps(schema)}",
        },
    ]


async def chat_text(
    oai: openai.AsyncOpenAI, *, stream: bool, **fields: Any
) -> tuple[str, str | None]:
    """The answer's content and finish reason, whole or reassembled from the stream."""
    if not stream:
        result = await oai.chat.completions.create(model=MODEL, **fields)
        return result.choices[0].message.content or "", result.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await oai.chat.completions.create(model=MODEL, stream=True, **fields):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def response_format(name: str) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMA_BY_NAME[name], "strict": True},
    }


@pytest.mark.slow  # default-suite time: CI runs it with -m slow
async def test_json_schema_outputs_validate_whole_and_streamed(oai: openai.AsyncOpenAI) -> None:
    failures: list[str] = []
    outcomes: dict[str | None, int] = {}

    async def one(name: str, seed: int, stream: bool) -> None:
        schema = SCHEMA_BY_NAME[name]
        text, finish = await chat_text(
            oai, stream=stream, messages=schema_messages(name, schema), response_format=response_format(name),
            temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
        )  # fmt: skip
        outcomes[finish] = outcomes.get(finish, 0) + 1
        if finish != "stop":
            assert finish == "length", (name, seed, finish)
            return
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{name} seed {seed} stream {stream}: {exc!s:.300} in {text!r:.300}")

    await asyncio.gather(
        *(one(name, seed, stream) for name in SUBSET for seed in (1, 2) for stream in (False, True))
    )
    assert not failures, "\n".join(failures)
    assert outcomes.get("stop", 0) >= 16, (
        outcomes
    )  # of 20: the model seldom rambles to max_tokens here
    # The same seed gives the same answer streamed or not.
    name = "nested_objects"
    fields = dict(messages=schema_messages(name, SCHEMA_BY_NAME[name]), response_format=response_format(name),
                  temperature=1.0, seed=5, max_tokens=MAX_TOKENS)  # fmt: skip
    assert await chat_text(oai, stream=False, **fields) == await chat_text(
        oai, stream=True, **fields
    )


@pytest.mark.slow  # default-suite time: CI runs it with -m slow
async def test_regex_and_choice_match_with_n_logprobs_and_prompt_lists(
    oai: openai.AsyncOpenAI,
) -> None:
    regex = r"[a-z]{3,8}@(example|test)\.(com|org)"
    choices = ["Paris", "London", "Berlin"]
    result = await oai.completions.create(
        model=MODEL, prompt=["My email address is", "Contact me at"], n=2, temperature=1.0, seed=3,
        max_tokens=40, logprobs=2, extra_body={"structured_outputs": {"regex": regex}},
    )  # fmt: skip
    assert len(result.choices) == 4
    for c in result.choices:
        assert c.finish_reason == "stop" and re.fullmatch(regex, c.text), c
        assert c.logprobs is not None and len(c.logprobs.tokens) > 0
    for seed in range(3):
        text, finish = await chat_text(
            oai, stream=bool(seed % 2), messages=[{"role": "user", "content": "A European capital?"}],
            temperature=1.0, seed=seed, max_tokens=20, extra_body={"guided_choice": choices},
        )  # fmt: skip
        assert text in choices and finish == "stop", (text, finish)


async def tool_calls(
    oai: openai.AsyncOpenAI, *, stream: bool, **fields: Any
) -> tuple[list[Any], str | None]:
    """(name, arguments JSON text, id) of each call, whole or reassembled from the deltas."""
    fields = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "temperature": 1.0,
        "max_tokens": 120,
        **fields,
    }
    if not stream:
        choice = (await oai.chat.completions.create(**fields)).choices[0]
        calls = choice.message.tool_calls or []
        # content beside calls only when max_tokens cut the array: the calls completed before
        # the cut, and the cut-off rest as text (nothing of the output is dropped)
        assert choice.message.content is None or calls == [] or choice.finish_reason == "length"
        return [(c.function.name, c.function.arguments, c.id) for c in calls], choice.finish_reason
    parts: dict[int, list[Any]] = {}
    finish = None
    async for chunk in await oai.chat.completions.create(stream=True, **fields):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or ():
                part = parts.setdefault(tc.index, [None, "", None])
                part[0] = (tc.function.name if tc.function else None) or part[0]
                part[1] += (tc.function.arguments if tc.function else "") or ""
                part[2] = tc.id or part[2]
    return [tuple(p) for _, p in sorted(parts.items())], finish


async def test_required_and_named_tool_calls_validate_and_stream_the_same(
    oai: openai.AsyncOpenAI,
) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        for choice, names in (("required", set(PARAMETERS)), (named, {"get_time"})):
            whole, finish = await tool_calls(oai, stream=False, tool_choice=choice, seed=seed)
            streamed, streamed_finish = await tool_calls(
                oai, stream=True, tool_choice=choice, seed=seed
            )
            assert finish == streamed_finish
            assert [c[:2] for c in streamed] == [c[:2] for c in whole]  # same seed: the same calls
            if finish == "length":
                continue
            assert finish == "tool_calls" and whole, (choice, seed, whole)
            for name, arguments, call_id in whole + streamed:
                assert name in names and call_id.startswith("call_")
                jsonschema.validate(json.loads(arguments), PARAMETERS[name])
    one, _ = await tool_calls(
        oai, stream=False, tool_choice="required", parallel_tool_calls=False, seed=1
    )
    assert len(one) <= 1


async def test_auto_and_a_tool_result_round_trip(oai: openai.AsyncOpenAI) -> None:
    """auto: the answer is content or parsed calls (each a known function with JSON object
    arguments); after an assistant call and the tool's result, a final answer comes."""
    for seed in range(2):
        result = await oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0,
                                                   seed=seed, max_tokens=80)  # fmt: skip
        choice = result.choices[0]
        for call in choice.message.tool_calls or ():
            assert call.function.name in PARAMETERS and isinstance(
                json.loads(call.function.arguments), dict
            )
        assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]  # fmt: skip
    # With the tools rendered (auto) the model answers from the tool's result, or calls again.
    result = await oai.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS,
                                               temperature=0.0, max_tokens=40)  # fmt: skip
    final = result.choices[0]
    assert final.message.content or final.message.tool_calls, final
    assert final.finish_reason in ("stop", "length", "tool_calls")
    # Without tools shown (tool_choice none) the final answer is text.
    result = await oai.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, tool_choice="none",
                                               temperature=0.0, max_tokens=40)  # fmt: skip
    assert result.choices[0].message.content and result.choices[0].message.tool_calls is None


async def test_bad_schemas_are_400s_naming_the_field_and_the_next_request_is_served(
    oai: openai.AsyncOpenAI,
) -> None:
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}},
         "response_format.json_schema.schema", "uniqueItems"),
        ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs.json", "nonsense"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name", "nope"),
    ]  # fmt: skip
    for fields, param, words in bad:
        with pytest.raises(openai.BadRequestError) as info:
            await oai.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=5, extra_body=fields
            )
        error = info.value.body
        assert isinstance(error, dict) and error["param"] == param and words in error["message"], (
            error
        )
        served = await oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5)
        assert served.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
async def test_every_schema_validates_over_http(oai: openai.AsyncOpenAI) -> None:
    """Every schema of tests/support/json_schemas.py x 4 seeds, half streamed: every output that
    ends with "stop" validates, and most do (the engine's sweep measures what runs to max_tokens)."""
    failures: list[str] = []
    stops = 0

    async def one(name: str, seed: int) -> None:
        nonlocal stops
        schema = SCHEMA_BY_NAME[name]
        text, finish = await chat_text(
            oai, stream=bool(seed % 2), messages=schema_messages(name, schema), response_format=response_format(name),
            temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
        )  # fmt: skip
        if finish == "length":
            return
        stops += 1
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{name} seed {seed}: {exc!s:.300}")

    await asyncio.gather(*(one(name, seed) for name, _ in SCHEMAS for seed in (1, 2, 3, 4)))
    assert not failures, "\n".join(failures)
    assert stops >= 80, stops
