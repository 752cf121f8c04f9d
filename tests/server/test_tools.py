"""Tool calling and structured output over HTTP with the fake engine (issue 22), through the
official `openai` client: the fake writes a scripted output (`FakeEngine.script`) so parsing is
deterministic; schemas and grammars are compiled by a real GrammarCompiler (the default model's
tokenizer), so what the engine would refuse is refused here too. Each user error is a 400 naming
the field, and the next request is served.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from server.conftest import MODEL
from server.fake_engine import FakeEngine
from server.helpers import TOOL_CONVERSATION, asgi_client
from shardline.engine.server import build_app
from shardline.engine.structured_output import GrammarCompiler, StructuredOutputSpec
from shardline.engine.tool_parsers import tool_choice_spec

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Oslo?"}]
CALL = '{"name": "weather", "arguments": {"city": "Oslo"}}'
HERMES = f"Let me look.<tool_call>\n{CALL}\n</tool_call>"


@pytest.fixture(scope="module")
def compiler(smollm2_dir: pathlib.Path) -> GrammarCompiler:
    return GrammarCompiler((smollm2_dir / "tokenizer.json").read_text(), eos_token_ids=[2])


@pytest.fixture
def fake_engine(compiler: GrammarCompiler) -> FakeEngine:
    return FakeEngine(max_model_len=4096, grammar_compiler=compiler)


@pytest.fixture
async def oai(client: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="none", http_client=client,
                                  max_retries=0) as c:  # fmt: skip
        yield c


async def chat(oai: openai.AsyncOpenAI, **fields: Any) -> Any:
    fields.setdefault("messages", ASK)
    fields.setdefault("max_tokens", 200)
    return await oai.chat.completions.create(model=MODEL, **fields)


async def streamed(
    oai: openai.AsyncOpenAI, **fields: Any
) -> tuple[list[Any], dict[int, dict[str, Any]]]:
    """The chunks' choices, and per choice what a client reassembles: content, calls by index, finish."""
    fields.setdefault("messages", ASK)
    fields.setdefault("max_tokens", 200)
    pieces: list[Any] = []
    out: dict[int, dict[str, Any]] = {}
    async for chunk in await oai.chat.completions.create(model=MODEL, stream=True, **fields):
        for c in chunk.choices:
            pieces.append(c)
            got = out.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
            got["content"] += c.delta.content or ""
            for tc in c.delta.tool_calls or ():
                call = got["calls"].setdefault(
                    tc.index, {"id": None, "name": None, "arguments": ""}
                )
                call["id"] = tc.id or call["id"]
                call["name"] = (tc.function.name if tc.function else None) or call["name"]
                call["arguments"] += (tc.function.arguments if tc.function else "") or ""
            got["finish"] = c.finish_reason or got["finish"]
    return pieces, out


async def assert_served(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 3}
    )
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- auto: the hermes parser
async def test_auto_parses_hermes_calls_into_tool_calls(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = HERMES
    result = await chat(oai, tools=TOOLS)  # tool_choice defaults to auto
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "weather",
        {"city": "Oslo"},
    )
    assert (
        fake_engine.last_params is not None and fake_engine.last_params.structured_output is None
    )  # free


async def test_auto_without_a_call_is_plain_content(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = "It is cold in Oslo."
    result = await chat(oai, tools=TOOLS, tool_choice="auto")
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].message.content == "It is cold in Oslo."
    assert result.choices[0].message.tool_calls is None
    _, out = await streamed(oai, tools=TOOLS)
    assert out[0] == {"content": "It is cold in Oslo.", "calls": {}, "finish": "stop"}


async def test_streamed_tool_calls_reassemble_into_the_same_calls(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = HERMES + '\n<tool_call>{"name": "time", "arguments": {}}</tool_call>'
    whole = (await chat(oai, tools=TOOLS)).choices[0]
    pieces, out = await streamed(oai, tools=TOOLS)
    got = out[0]
    assert got["finish"] == whole.finish_reason == "tool_calls"
    assert (
        got["content"] == whole.message.content == "Let me look.\n"
    )  # text between calls is content
    assert (
        [(c["name"], json.loads(c["arguments"])) for _, c in sorted(got["calls"].items())]
        == [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
        == [("weather", {"city": "Oslo"}), ("time", {})]
    )
    assert all(c["id"].startswith("call_") for c in got["calls"].values())
    # As OpenAI sends them: the first delta of a call has its id, type and name.
    firsts = [tc for p in pieces for tc in (p.delta.tool_calls or ()) if tc.id is not None]
    assert [(tc.index, tc.type, tc.function.name) for tc in firsts] == [
        (0, "function", "weather"),
        (1, "function", "time"),
    ]
    assert pieces[-1].finish_reason == "tool_calls"


async def test_parallel_tool_calls_false_keeps_the_first_call(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>"
    result = await chat(oai, tools=TOOLS, parallel_tool_calls=False)
    assert len(result.choices[0].message.tool_calls) == 1
    _, out = await streamed(oai, tools=TOOLS, parallel_tool_calls=False)
    assert list(out[0]["calls"]) == [0]
    assert len((await chat(oai, tools=TOOLS)).choices[0].message.tool_calls) == 2


async def test_n_choices_each_parse_their_calls(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = HERMES
    result = await chat(oai, tools=TOOLS, n=2)
    assert [c.finish_reason for c in result.choices] == ["tool_calls"] * 2
    _, out = await streamed(oai, tools=TOOLS, n=2)
    assert sorted(out) == [0, 1] and all(len(o["calls"]) == 1 for o in out.values())


# ---------------------------------------------------------------------- required / named: a grammar
@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "weather"}}]
)
async def test_required_and_named_decode_with_the_tool_grammar(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine, tool_choice: Any
) -> None:
    fake_engine.script = f"[{CALL}]"
    result = await chat(oai, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    params = fake_engine.last_params
    assert params is not None and params.structured_output == tool_choice_spec(
        TOOLS, tool_choice, False
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "weather",
        {"city": "Oslo"},
    )
    _, out = await streamed(oai, tools=TOOLS, tool_choice=tool_choice)
    assert out[0]["finish"] == "tool_calls" and out[0]["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in out[0]["calls"].values()] == [
        ("weather", {"city": "Oslo"})
    ]


async def test_a_call_cut_by_max_tokens_ends_with_length(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = f"[{CALL}]"
    result = await chat(oai, tools=TOOLS, tool_choice="required", max_tokens=10)
    choice = result.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert (
        choice.message.content == fake_engine.script[1:10]
    )  # the unfinished call, after the array's "["
    _, out = await streamed(oai, tools=TOOLS, tool_choice="required", max_tokens=10)
    assert out[0] == {"content": fake_engine.script[1:10], "calls": {}, "finish": "length"}


async def test_tool_choice_none_neither_shows_nor_parses_tools(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = HERMES
    result = await chat(oai, tools=TOOLS, tool_choice="none")
    assert result.choices[0].message.content == HERMES and result.choices[0].finish_reason == "stop"
    assert fake_engine.last_messages == ASK and fake_engine.last_tools is None


# ---------------------------------------------------------------------- rendering
async def test_tools_go_to_the_template_that_reads_them_else_the_default_prompt(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    fake_engine.script = "ok"
    await chat(oai, tools=TOOLS)  # the fake's template does not read tools
    assert fake_engine.last_tools is None
    messages = fake_engine.last_messages
    assert messages is not None and messages[0]["role"] == "system" and messages[1:] == ASK
    assert (
        "<tool_call>" in messages[0]["content"]
        and json.dumps(WEATHER["function"]) in messages[0]["content"]
    )
    fake_engine.tokenizer.chat_template = "{% for t in tools %}{{ t }}{% endfor %}{{ messages }}"  # type: ignore[attr-defined]
    await chat(oai, tools=TOOLS)
    assert fake_engine.last_tools == TOOLS and fake_engine.last_messages == ASK


async def test_a_tool_result_round_trips_through_the_template(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine, client: httpx.AsyncClient
) -> None:
    fake_engine.script = "It is -3 C in Oslo."
    fake_engine.tokenizer.chat_template = "{{ tools }}"  # type: ignore[attr-defined]
    result = await chat(oai, tools=TOOLS, messages=TOOL_CONVERSATION)
    assert (
        result.choices[0].message.content == "It is -3 C in Oslo."
        and result.choices[0].finish_reason == "stop"
    )
    sent = fake_engine.last_messages
    assert sent is not None and sent[1]["tool_calls"][0]["function"] == {
        "name": "weather",
        "arguments": {"city": "Oslo"},
    }
    assert sent[2]["tool_call_id"] == "call_1" and fake_engine.last_tools == TOOLS


# ---------------------------------------------------------------------- structured output fields
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(("fields", "spec"), [
    ({"response_format": {"type": "json_object"}}, StructuredOutputSpec.json_object()),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredOutputSpec.json(SCHEMA)),
    ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutputSpec.regex("[a-z]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputSpec.choice(["yes", "no"])),
    ({"structured_outputs": {"grammar": 'start: "a"+'}}, StructuredOutputSpec.grammar('start: "a"+')),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "llguidance"}, StructuredOutputSpec.json(SCHEMA)),
    ({"guided_choice": ["x", "y"]}, StructuredOutputSpec.choice(["x", "y"])),
])  # fmt: skip
async def test_structured_output_fields_reach_the_engine_compiled(
    client: httpx.AsyncClient,
    fake_engine: FakeEngine,
    fields: dict[str, Any],
    spec: StructuredOutputSpec,
) -> None:
    for path, body in (
        ("/v1/chat/completions", {"messages": ASK}),
        ("/v1/completions", {"prompt": ["a", "b"]}),
    ):
        fake_engine.params_seen.clear()
        r = await client.post(path, json={"model": MODEL, "max_tokens": 3, **body, **fields})
        assert r.status_code == 200, r.text
        assert fake_engine.compiled[-1] == spec
        assert [p.structured_output for p in fake_engine.params_seen] == [spec] * (
            2 if "prompt" in body else 1
        )


# ---------------------------------------------------------------------- user errors
BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_*", "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs.grammar", ""),
    ({"guided_regex": "(", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "llguidance"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "nope"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "required"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}]},
     "tools[0].function.parameters", "uniqueItems"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "twice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "tool_choice"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "words"), BAD)
async def test_user_errors_are_400_naming_the_field_and_the_next_request_is_served(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str, words: str
) -> None:
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 3,
                                                          "stream": stream, **fields})  # fmt: skip
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        assert words in error["message"], error
        await assert_served(client)


async def test_completions_refuse_tools_by_name(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    await assert_served(client)


# ---------------------------------------------------------------------- --tool-call-parser
async def test_the_server_parser_reads_auto_answers_when_the_template_renders_tools(
    fake_engine: FakeEngine,
) -> None:
    fake_engine.tokenizer.chat_template = "{{ tools }}"  # type: ignore[attr-defined]
    fake_engine.script = '<|python_tag|>{"name": "weather", "parameters": {"city": "Oslo"}}'
    app = build_app(
        fake_engine, served_model_name=MODEL, api_key=None, tool_call_parser="llama3_json"
    )
    async with asgi_client(app) as client:
        body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 200}
        r = await client.post("/v1/chat/completions", json=body)
    message = r.json()["choices"][0]["message"]
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["weather"]
    # With the default tool prompt (a template without tools) the model was asked for Hermes.
    fake_engine.tokenizer.chat_template = None  # type: ignore[attr-defined]
    fake_engine.script = HERMES
    async with asgi_client(app) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
    with pytest.raises(ValueError, match="llama3_json"):
        build_app(fake_engine, served_model_name=MODEL, api_key=None, tool_call_parser="nope")


def test_serve_takes_the_tool_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardline.engine import cli, model_info
    from shardline.engine.server import launch

    # cli.main configures the root logger and the workers' level variable: put both back.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("SHARDLINE_LOG_LEVEL", os.environ.get("SHARDLINE_LOG_LEVEL", "INFO"))
    seen: list[Any] = []
    monkeypatch.setattr(launch, "serve", lambda config, options: seen.append(options) or 0)
    monkeypatch.setattr(model_info, "check_model_config", lambda config: None)
    argv = ["serve", "--tool-call-parser", "llama3_json", "--enable-auto-tool-choice"]
    assert cli.main(argv) == 0
    assert cli.main(["serve"]) == 0
    assert [o.tool_call_parser for o in seen] == ["llama3_json", "hermes"]
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--tool-call-parser", "mistral"])
    assert info.value.code == 2


async def test_echo_leads_the_content_beside_tool_calls(
    client: httpx.AsyncClient, fake_engine: FakeEngine
) -> None:
    fake_engine.script = HERMES
    messages = [*ASK, {"role": "assistant", "content": "Sure. "}]
    body = {"model": MODEL, "messages": messages, "tools": TOOLS, "echo": True, "max_tokens": 200}
    choice = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]
    assert choice["message"]["content"] == "Sure. Let me look."
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1


async def test_the_returned_message_goes_back_as_it_came(
    oai: openai.AsyncOpenAI, fake_engine: FakeEngine
) -> None:
    """OpenAI's documented loop: append the response's message object and the tool's result."""
    fake_engine.script = f"[{CALL}]"
    first = await chat(oai, tools=TOOLS, tool_choice="required")
    message = first.choices[0].message
    call = message.tool_calls[0]
    fake_engine.script = "It is -3 C."
    messages = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "-3 C"}]
    final = await chat(oai, tools=TOOLS, messages=messages)
    assert final.choices[0].message.content == "It is -3 C."
    sent = fake_engine.last_messages
    assert sent is not None and sent[-2]["tool_calls"] == [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": "weather", "arguments": {"city": "Oslo"}},
        }
    ]
    assert sent[-1] == {"role": "tool", "content": "-3 C", "tool_call_id": call.id}
