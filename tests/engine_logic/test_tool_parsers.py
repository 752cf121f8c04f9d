"""Tool-call parsers (hermes, llama3_json, json_array), the tool_choice grammar, and the default
tool prompt (issue 22, phase 1)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.engine.errors import InvalidRequestError
from shardline.engine.structured_output import GrammarCompiler
from shardline.engine.tool_parsers import (
    DEFAULT_TOOL_PROMPT_PARSER,
    ParsedToolCalls,
    StreamDelta,
    ToolCallDelta,
    get_tool_parser,
    reassemble,
    template_uses_tools,
    tool_choice_schema,
    tool_choice_spec,
    with_default_tool_prompt,
)
from support.json_schemas import WalkVocab, random_walk

HERMES = [
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, 2]}}\n</tool_call>',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": "</tool"}}'
    "</tool_call> after",
    '<tool_call>{"name": "f", "arguments": "{\\"q\\": 1}"}</tool_call>',  # arguments as a JSON string
    '<tool_call>{"name": "unclosed", "arguments": {"k": true}}',  # the model stopped before </tool_call>
    "no calls at all, but a < sign and <tool",
    '<tool_call>{not json}</tool_call> then <tool_call>{"name": "ok", "arguments": {}}</tool_call>',
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
    "<tool_call>",
]
LLAMA3 = [
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
    '  \n{"name": "a", "parameters": {"t": true}} ; {"name": "b", "parameters": {"f": false, "n": null}}',
    "The weather is fine.",
    '{"name": "a", "parameters": {"x": 1}}; not json',
    '{"name": "a", "parameters": {"x": 1}}; {"no": "name"}',
    '{"name": "a", "parameters": {"x": 1',  # cut off
    "<|python_tag|>",
    "",
]
ARRAYS = [
    '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": [true]}}]',
    '[{"name":"a","arguments":{}}]',
    '[{"name": "a", "arguments": {}}] trailing',
    "[1, 2]",
    "not an array",
]


def strip_ids(parsed: ParsedToolCalls) -> tuple[str, list[tuple[str, str]]]:
    return parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


def test_hermes_whole_text() -> None:
    parser = get_tool_parser("hermes")
    content, calls = strip_ids(parser.parse(HERMES[0]))
    assert content == "Checking.\n" and calls == [("get_weather", '{"city": "Paris", "n": [1, 2]}')]
    content, calls = strip_ids(parser.parse(HERMES[1]))
    assert content == " after" and calls == [("a", "{}"), ("b", '{"x": "</tool"}')]
    assert strip_ids(parser.parse(HERMES[2]))[1] == [("f", '{"q": 1}')]
    assert strip_ids(parser.parse(HERMES[3]))[1] == [("unclosed", '{"k": true}')]
    parsed = parser.parse(HERMES[0])
    assert parsed.tool_calls[0].id.startswith("call_") and len(parsed.tool_calls[0].id) == 29
    assert parsed.tool_calls[0].to_openai()["function"]["name"] == "get_weather"


@pytest.mark.parametrize("text", HERMES[4:])
def test_hermes_malformed_calls_fall_back_to_content(text: str) -> None:
    parsed = get_tool_parser("hermes").parse(text)
    if "ok" in text:
        assert [c.name for c in parsed.tool_calls] == ["ok"]
        assert parsed.content == "<tool_call>{not json}</tool_call> then "
    else:
        assert parsed.tool_calls == [] and parsed.content == text


def test_llama3_json_whole_text() -> None:
    parser = get_tool_parser("llama3_json")
    assert strip_ids(parser.parse(LLAMA3[0])) == ("", [("get_weather", '{"city": "Oslo"}')])
    assert strip_ids(parser.parse(LLAMA3[1])) == ("", [("a", '{"x": 1}'), ("b", "{}")])
    assert strip_ids(parser.parse(LLAMA3[2]))[1] == [
        ("a", '{"t": true}'),
        ("b", '{"f": false, "n": null}'),
    ]
    assert strip_ids(parser.parse(LLAMA3[3])) == ("The weather is fine.", [])
    assert strip_ids(parser.parse(LLAMA3[4])) == ("not json", [("a", '{"x": 1}')])
    assert strip_ids(parser.parse(LLAMA3[5])) == ('{"no": "name"}', [("a", '{"x": 1}')])
    assert strip_ids(parser.parse(LLAMA3[6])) == (LLAMA3[6], [])


def test_json_array_whole_text() -> None:
    parser = get_tool_parser("json_array")
    assert strip_ids(parser.parse(ARRAYS[0]))[1] == [("a", '{"x": 1}'), ("b", '{"y": [true]}')]
    assert strip_ids(parser.parse(ARRAYS[2])) == (" trailing", [("a", "{}")])
    assert strip_ids(parser.parse(ARRAYS[3])) == ("1, 2]", [])
    assert strip_ids(parser.parse(ARRAYS[4])) == ("not an array", [])


def streamed(name: str, text: str, cuts: list[int]) -> tuple[ParsedToolCalls, list[StreamDelta]]:
    stream = get_tool_parser(name).stream()
    bounds = [0, *sorted({min(c, len(text)) for c in cuts}), len(text)]
    deltas = [stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    deltas.append(stream.finish())
    return reassemble(deltas), deltas


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        [("hermes", t) for t in HERMES]
        + [("llama3_json", t) for t in LLAMA3]
        + [("json_array", t) for t in ARRAYS]
    ),
    st.lists(st.integers(min_value=0, max_value=200), max_size=30),
)
def test_streamed_deltas_reassemble_into_the_whole_text_parse(
    case: tuple[str, str], cuts: list[int]
) -> None:
    name, text = case
    whole = get_tool_parser(name).parse(text)
    parsed, deltas = streamed(name, text, cuts)
    assert strip_ids(parsed) == strip_ids(whole)
    for call in parsed.tool_calls:
        assert call.id.startswith("call_")
    for d in deltas:  # each call's first delta carries its id and name, later ones only arguments
        for tc in d.tool_calls:
            assert (tc.id is None) == (tc.name is None)


def test_streaming_emits_content_early_and_holds_a_possible_marker() -> None:
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Hello <to").content == "Hello "
    assert stream.feed("day").content == "<today"
    assert stream.feed('<tool_call>{"name": "f", ').tool_calls == []
    out = stream.feed('"arguments": {}}</tool_call>')
    assert [tc.to_openai() for tc in out.tool_calls][1] == {
        "index": 0,
        "function": {"arguments": "{}"},
    }
    first = out.tool_calls[0].to_openai()
    assert first["type"] == "function" and first["function"] == {"name": "f", "arguments": ""}
    assert not stream.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        stream.feed("x")


def test_unknown_parser_is_refused_with_the_names() -> None:
    with pytest.raises(ValueError, match="hermes, json_array, llama3_json"):
        get_tool_parser("mistral")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "number", "minimum": 0}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]


@pytest.fixture(scope="module")
def compiler(smollm2_dir: pathlib.Path) -> GrammarCompiler:
    return GrammarCompiler((smollm2_dir / "tokenizer.json").read_text(), eos_token_ids=[2])


@pytest.fixture(scope="module")
def walk_vocab(smollm2_dir: pathlib.Path, compiler: GrammarCompiler) -> tuple[Any, WalkVocab]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    return tok, WalkVocab([tok.decode([i]) for i in range(compiler.vocab_size)])


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize(
    "choice",
    [
        "required",
        {"type": "function", "function": {"name": "add"}},
        {"type": "function", "function": {"name": "ping"}},
    ],
)
def test_constrained_tool_calls_always_parse_into_valid_calls(
    choice: Any, parallel: bool, compiler: GrammarCompiler, walk_vocab: tuple[Any, WalkVocab]
) -> None:
    tok, vocab = walk_vocab
    spec = tool_choice_spec(TOOLS, choice, parallel)
    assert spec is not None
    params = {
        t["function"]["name"]: t["function"].get(
            "parameters", {"type": "object", "maxProperties": 0}
        )
        for t in TOOLS
    }
    for seed in range(8):
        m = compiler.matcher(spec)
        tokens = random_walk(
            m.fill_bitmask, lambda t, m=m: m.accept([t]), [2], vocab, np.random.default_rng(seed)
        )
        parsed = get_tool_parser("json_array").parse(tok.decode(tokens[:-1]))
        assert parsed.content == "" and parsed.tool_calls
        if not parallel:
            assert len(parsed.tool_calls) == 1
        for call in parsed.tool_calls:
            if isinstance(choice, dict):
                assert call.name == choice["function"]["name"]
            jsonschema.validate(json.loads(call.arguments), params[call.name])


def test_tool_choice_none_and_auto_need_no_grammar() -> None:
    assert tool_choice_schema(TOOLS, "none") is None and tool_choice_schema(TOOLS, "auto") is None
    assert tool_choice_spec(TOOLS, None) is None


@pytest.mark.parametrize(
    ("tools", "choice", "field"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        (TOOLS, "sometimes", "tool_choice"),
        ([], "required", "tools"),
        ([{"type": "retrieval"}], "required", "tools[0].type"),
        ([{"type": "function", "function": {"name": ""}}], "required", "tools[0].function.name"),
        ([TOOLS[0], TOOLS[0]], "required", "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            "required",
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tools_and_tool_choice_name_the_field(tools: Any, choice: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        tool_choice_schema(tools, choice)
    assert info.value.field == field


def test_a_tool_parameter_schema_the_grammar_cannot_enforce_is_refused(
    compiler: GrammarCompiler,
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {"ids": {"type": "array", "uniqueItems": True}},
                },
            },
        }
    ]
    spec = tool_choice_spec(tools, "required")
    assert spec is not None
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(spec)
    assert info.value.field == "tools" and "uniqueItems" in info.value.message


def test_template_uses_tools_and_the_default_prompt(smollm2_dir: pathlib.Path) -> None:
    assert not template_uses_tools((smollm2_dir / "chat_template.jinja").read_text())
    assert template_uses_tools(
        "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
    )
    assert not template_uses_tools("{% set tools = 1 %}{{ tools }}") and not template_uses_tools(
        None
    )
    messages = with_default_tool_prompt([{"role": "user", "content": "hi"}], TOOLS)
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert "<tool_call>" in messages[0]["content"] and DEFAULT_TOOL_PROMPT_PARSER == "hermes"
    with_system = with_default_tool_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], TOOLS
    )
    assert len(with_system) == 2 and with_system[0]["content"].endswith("Be brief.")


def test_tool_call_delta_shape_is_openais() -> None:
    assert ToolCallDelta(1, id="call_x", name="f").to_openai() == {
        "index": 1,
        "id": "call_x",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert not StreamDelta()
