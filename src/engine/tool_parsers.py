"""Tool calling: parsers for the model's tool-call text, the grammar that enforces
`tool_choice="required"` / a named function, and the default tool system prompt (issue 22).

Parsers are chosen by name, like vLLM's `--tool-call-parser` (`get_tool_parser(name)`):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them;
  text outside them is content (Hermes 2/3, Qwen 2.5, and the default tool prompt below).
- `llama3_json`: Llama 3.1/3.2 JSON style: the output is `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`), several separated by `;`. Output that does not start so is
  content.
- `json_array`: `[{"name": ..., "arguments": {...}}, ...]`, the format the `required` / named
  function grammar (`tool_choice_spec`) produces.

Every parser is incremental: `parser.stream()` gives a `ToolCallStream` whose `feed(delta)`
returns what can be settled so far (content text, and tool-call deltas: first one carrying the
call's id and name, then its argument text) and whose `finish()` settles the rest. The
whole-text `parser.parse(text)` is the same machine fed everything at once, so the deltas of any
chunking reassemble into the calls of the whole-text parse (tests check it over many chunkings).
A call is emitted once its JSON is complete (its arguments arrive in one fragment); text that is
not a well-formed call (bad JSON, no name, arguments not an object) is content, never an error.

Arguments are a JSON string (`json.dumps(arguments, ensure_ascii=False)`), ids `call_<24 hex>`.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from shardline.engine.errors import InvalidRequestError
from shardline.engine.structured_output import StructuredOutputSpec


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = dataclasses.field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a call: the first carries `id` and `name`, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index, "function": function}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        return out


@dataclasses.dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclasses.dataclass(frozen=True)
class ParsedToolCalls:
    """`content`: the text outside the calls, as generated (the HTTP layer sends null for a
    blank content beside tool calls, as OpenAI does)."""

    content: str
    tool_calls: list[ToolCall]


def reassemble(deltas: Sequence[StreamDelta]) -> ParsedToolCalls:
    """What a client does with the deltas: concatenate content; per index, take id and name
    and concatenate argument fragments."""
    content = "".join(d.content for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for tc in d.tool_calls:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] = tc.name or call["name"]
            call["arguments"] += tc.arguments
    return ParsedToolCalls(
        content, [ToolCall(c["name"], c["arguments"], c["id"]) for _, c in sorted(calls.items())]
    )


def _as_call(value: Any, arguments_key: str) -> ToolCall | None:
    """A decoded JSON value as a call, or None when it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    keys = (arguments_key, "arguments", "parameters")
    present = [k for k in dict.fromkeys(keys) if k in value]
    if len(present) > 1 or set(value) - {"name", *present}:
        return None
    arguments = value[present[0]] if present else {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Incremental parse of one output; subclasses implement `_settle`."""

    def __init__(self) -> None:
        self._buffer = ""
        self._index = 0
        self._done = False

    def feed(self, delta: str) -> StreamDelta:
        if self._done:
            raise RuntimeError("feed after finish")
        self._buffer += delta
        return self._run(final=False)

    def finish(self) -> StreamDelta:
        out = self._run(final=True)
        self._done = True
        return out

    def _run(self, final: bool) -> StreamDelta:
        out = StreamDelta()
        consumed = self._settle(self._buffer, final, out)
        self._buffer = self._buffer[consumed:]
        return out

    def _emit(self, out: StreamDelta, call: ToolCall) -> None:
        out.tool_calls.append(ToolCallDelta(self._index, id=call.id, name=call.name))
        out.tool_calls.append(ToolCallDelta(self._index, arguments=call.arguments))
        self._index += 1

    def _settle(self, text: str, final: bool, out: StreamDelta) -> int:
        """Append what `text` (the unsettled buffer) settles to `out`; return how many of its
        characters are settled."""
        raise NotImplementedError


class ToolParser:
    name: ClassVar[str]
    stream_class: ClassVar[type[ToolCallStream]]

    def stream(self) -> ToolCallStream:
        return self.stream_class()

    def parse(self, text: str) -> ParsedToolCalls:
        s = self.stream()
        return reassemble([s.feed(text), s.finish()])


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _HermesStream(ToolCallStream):
    START, END = "<tool_call>", "</tool_call>"

    def _settle(self, text: str, final: bool, out: StreamDelta) -> int:
        pos = 0
        while True:
            start = text.find(self.START, pos)
            if start < 0:
                keep = 0 if final else _held_prefix(text[pos:], self.START)
                out.content += text[pos : len(text) - keep]
                return len(text) - keep
            out.content += text[pos:start]
            end = text.find(self.END, start + len(self.START))
            if end < 0 and not final:
                return start
            body_end = len(text) if end < 0 else end  # unclosed at the end: a model that stopped
            stop = len(text) if end < 0 else end + len(self.END)
            call = _decode_call(text[start + len(self.START) : body_end], "arguments")
            if call is None:
                out.content += text[start:stop]
            else:
                self._emit(out, call)
            pos = stop


def _decode_call(body: str, arguments_key: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return _as_call(value, arguments_key)


class HermesToolParser(ToolParser):
    name = "hermes"
    stream_class = _HermesStream


_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"


class _JsonSequenceStream(ToolCallStream):
    """Calls as consecutive JSON objects: after an optional `opener`, objects separated by
    `separator` (and whitespace), up to an optional `closer`. Output that does not begin so is
    content; after the first object that is not a call, the rest is content."""

    openers: ClassVar[tuple[str, ...]] = ()
    bare_objects: ClassVar[bool] = False  # an output may also start with the first object
    separator: ClassVar[str] = ";"
    closer: ClassVar[str] = ""
    arguments_key: ClassVar[str] = "parameters"

    def __init__(self) -> None:
        super().__init__()
        self._mode = "undecided"  # then "calls" or "content"

    def _settle(self, text: str, final: bool, out: StreamDelta) -> int:
        pos = 0
        if self._mode == "undecided":
            stripped = text.lstrip(_SPACE)
            opener = next((o for o in self.openers if stripped.startswith(o)), None)
            if opener is not None:
                self._mode, pos = "calls", len(text) - len(stripped) + len(opener)
            elif stripped.startswith("{") and self.bare_objects:
                self._mode, pos = "calls", len(text) - len(stripped)
            elif not final and (not stripped or any(o.startswith(stripped) for o in self.openers)):
                return 0
            else:
                self._mode = "content"
        if self._mode == "content":
            out.content += text
            return len(text)
        while True:
            while pos < len(text) and (text[pos] in _SPACE or text[pos] == self.separator):
                pos += 1
            if self.closer and text.startswith(self.closer, pos):
                self._mode = "content"
                pos += len(self.closer)
                return pos + self._settle(text[pos:], final, out)
            if pos == len(text):
                return pos
            try:
                value, end = _DECODER.raw_decode(text, pos)
            except ValueError:
                if not final:
                    return pos  # maybe incomplete: wait for more
                out.content += text[pos:]
                return len(text)
            call = _as_call(value, self.arguments_key)
            if call is None:
                self._mode = "content"
                out.content += text[pos:]
                return len(text)
            self._emit(out, call)
            pos = end


class _Llama3Stream(_JsonSequenceStream):
    openers = ("<|python_tag|>",)
    bare_objects = True
    separator = ";"
    arguments_key = "parameters"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    stream_class = _Llama3Stream


class _ArrayStream(_JsonSequenceStream):
    openers = ("[",)
    separator = ","
    closer = "]"
    arguments_key = "arguments"


class JsonArrayToolParser(ToolParser):
    name = "json_array"
    stream_class = _ArrayStream


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, JsonArrayToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser `--tool-call-parser NAME` names; ValueError listing the names otherwise."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}; available: {', '.join(sorted(TOOL_PARSERS))}"
        ) from None


# ---------------------------------------------------------------------- tools and tool_choice
def validate_tools(tools: Any, field: str = "tools") -> list[dict[str, Any]]:
    """OpenAI's `tools`: a list of {"type": "function", "function": {"name", "description",
    "parameters", "strict"}}; returns the function dicts. Names must be unique."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError(field, "must be a non-empty list of tools")
    functions, names = [], set()
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidRequestError(
                f"{where}.type", "only tools of type 'function' are supported"
            )
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise InvalidRequestError(f"{where}.function", "must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise InvalidRequestError(
                f"{where}.function.name", "must be a string of 1-64 characters"
            )
        if name in names:
            raise InvalidRequestError(f"{where}.function.name", f"{name!r} is defined twice")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidRequestError(
                f"{where}.function.parameters", "must be a JSON schema object"
            )
        functions.append(dict(fn))
    return functions


def _call_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    if params is None:  # OpenAI: no parameters is a function that takes none
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_choice_schema(
    tools: Any, tool_choice: Any, parallel_tool_calls: bool = True
) -> dict[str, Any] | None:
    """The JSON schema that enforces `tool_choice`: None for "none" and "auto"; for "required"
    an array of at least one call to any tool, for {"type": "function", "function": {"name"}}
    calls of that function. Each call is {"name": <const>, "arguments": <its parameters>};
    `parallel_tool_calls` false allows exactly one. `JsonArrayToolParser` parses the output.
    A tool's parameter schema that the grammar cannot enforce is refused when compiled."""
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    functions = validate_tools(tools)
    if tool_choice == "required":
        chosen = functions
    elif isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise InvalidRequestError(
                "tool_choice.function.name", f"{name!r} is not one of the tools"
            )
    else:
        raise InvalidRequestError(
            "tool_choice",
            "must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
        )
    if not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError("parallel_tool_calls", "must be a bool")
    items = (
        _call_schema(chosen[0])
        if len(chosen) == 1
        else {"anyOf": [_call_schema(f) for f in chosen]}
    )
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def tool_choice_spec(
    tools: Any, tool_choice: Any, parallel_tool_calls: bool = True
) -> StructuredOutputSpec | None:
    """`tool_choice_schema` as the structured-output spec to decode with (field "tools" in errors)."""
    schema = tool_choice_schema(tools, tool_choice, parallel_tool_calls)
    return None if schema is None else StructuredOutputSpec.json(schema, field="tools")


# ---------------------------------------------------------------------- prompting
def template_uses_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` (transformers passes `tools=` to the template as a
    variable; a template that never reads it drops them silently)."""
    if not chat_template:
        return False
    import jinja2
    import jinja2.meta

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return "tools" in chat_template
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


DEFAULT_TOOL_PROMPT = """You are a function-calling assistant. You may call one or more of the \
functions described below to help with the user's request.

Functions (JSON schema of each):
<tools>
{tools}
</tools>

To call a function, reply with one block per call, each exactly of this form:
<tool_call>
{{"name": <function-name>, "arguments": <arguments as a JSON object>}}
</tool_call>
Results come back in messages from the tool. If no function is needed, reply normally."""
# The parser that reads replies written to DEFAULT_TOOL_PROMPT.
DEFAULT_TOOL_PROMPT_PARSER = "hermes"


def default_tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """DEFAULT_TOOL_PROMPT with the tools' functions, one JSON line each."""
    functions = validate_tools(list(tools))
    return DEFAULT_TOOL_PROMPT.format(
        tools="\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    )


def with_default_tool_prompt(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation for a template that does not take `tools`: the tool prompt leads the
    first system message (a new one when there is none)."""
    prompt = default_tool_prompt(tools)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{prompt}\n\n{out[0]['content']}"
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
