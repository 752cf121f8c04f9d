"""Tool calling on `/v1/chat/completions` (issue 22): `tools`, `tool_choice`, `parallel_tool_calls`.

`plan_tools` decides, before anything runs, how a request's tools reach the model and how its
output is read back:

- the tools are rendered by the model's chat template when it reads `tools` (as transformers'
  `apply_chat_template(tools=...)`), else by the default tool system prompt
  (`tool_parsers.DEFAULT_TOOL_PROMPT`, Hermes-style `<tool_call>` blocks);
- `tool_choice="required"` or a named function: the output is constrained by a grammar to a JSON
  array of calls whose arguments match the function's `parameters` (`tool_parsers.tool_choice_spec`)
  and read by the `json_array` parser;
- `"auto"` (the default with tools): the output is free and read by the server's
  `--tool-call-parser` (default `hermes`; with the default tool prompt, always `hermes`, the format
  that prompt asks for);
- `"none"`: the tools are not shown to the model and nothing is parsed.

Every tool's `parameters` schema is compiled up front, so one the grammar cannot enforce is a 400
naming `tools[i].function.parameters` whatever the tool_choice.

`ToolCallOutput` turns a choice's text (whole, or streamed delta by delta) into OpenAI's
`content` / `tool_calls` / `finish_reason`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shardline.engine.errors import InvalidRequestError
from shardline.engine.server.errors import APIError, api_error_from
from shardline.engine.structured_output import StructuredOutputSpec
from shardline.engine.tool_parsers import (
    DEFAULT_TOOL_PROMPT_PARSER,
    ToolCall,
    ToolCallStream,
    ToolParser,
    get_tool_parser,
    template_uses_tools,
    tool_choice_spec,
    validate_tools,
    with_default_tool_prompt,
)

DEFAULT_TOOL_CALL_PARSER = "hermes"


@dataclass
class ToolPlan:
    """How one chat request's tools are rendered and read back."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = (
        None  # passed to the chat template (None: not rendered there)
    )
    spec: StructuredOutputSpec | None = None  # the grammar of `required` / a named function
    parser: ToolParser | None = None  # None: the output is plain content
    parallel: bool = True


def _invalid(exc: InvalidRequestError) -> APIError:
    return api_error_from(exc)


async def plan_tools(
    req: Any,
    messages: list[dict[str, Any]],
    *,
    chat_template: str | None,
    parser_name: str,
    structured: StructuredOutputSpec | None,
    compile_grammar: Callable[[StructuredOutputSpec], Awaitable[Any]],
) -> ToolPlan:
    """The `ToolPlan` of a chat request (see the module docstring); 400s name the field at fault.
    `structured`: the request's own structured output (response_format, ...), which may not be
    combined with a tool_choice that is itself a grammar."""
    tools, choice = req.tools, req.tool_choice
    parallel = True if req.parallel_tool_calls is None else req.parallel_tool_calls
    if not tools:  # none, or [] (asks for nothing)
        if choice not in (None, "none", "auto"):
            raise APIError(400, f"invalid tool_choice: {choice!r} needs tools, and the request has none",
                           param="tool_choice", code="invalid_value")  # fmt: skip
        return ToolPlan(messages=messages)
    try:
        functions = validate_tools(tools)
    except InvalidRequestError as exc:
        raise _invalid(exc) from exc
    choice = "auto" if choice is None else choice
    try:
        spec = tool_choice_spec(
            tools, choice, parallel
        )  # also refuses a bad or unknown tool_choice
    except InvalidRequestError as exc:
        raise _invalid(exc) from exc
    for i, fn in enumerate(functions):
        if fn.get("parameters") is not None:
            try:
                await compile_grammar(StructuredOutputSpec.json(
                    fn["parameters"], field=f"tools[{i}].function.parameters"))  # fmt: skip
            except InvalidRequestError as exc:
                raise _invalid(exc) from exc
    if choice == "none":
        return ToolPlan(messages=messages)
    if spec is not None and structured is not None:
        name = structured.field.split(".")[0]
        raise APIError(400, f"invalid {name}: tool_choice {choice!r} already constrains the output to tool "
                       "calls; send one or the other", param=name, code="invalid_value")  # fmt: skip
    rendered = template_uses_tools(chat_template)
    if spec is not None:
        parser = get_tool_parser("json_array")
    else:
        parser = get_tool_parser(parser_name if rendered else DEFAULT_TOOL_PROMPT_PARSER)
    if rendered:
        return ToolPlan(
            messages=messages, tools=list(tools), spec=spec, parser=parser, parallel=parallel
        )
    return ToolPlan(
        messages=with_default_tool_prompt(messages, tools),
        spec=spec,
        parser=parser,
        parallel=parallel,
    )


def finish_reason_of(finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI's `tool_calls` for an answer that made calls and ended as the model chose (`stop`);
    `length` (and the rest) stay."""
    return "tool_calls" if num_calls and finish_reason == "stop" else finish_reason


def message_parts(
    parser: ToolParser, text: str, *, parallel: bool
) -> tuple[str | None, list[ToolCall]]:
    """The whole text of a choice as (content, calls): content is null when calls were made and
    the rest is blank; with `parallel` false only the first call is kept."""
    parsed = parser.parse(text)
    calls = parsed.tool_calls if parallel else parsed.tool_calls[:1]
    content: str | None = parsed.content
    if calls and not parsed.content.strip():
        content = None
    return content, calls


@dataclass
class ToolCallOutput:
    """One streamed choice read by a tool-call parser: `feed` each output's delta, get the content
    and tool-call deltas to send (OpenAI's shape). Blank content is held back until text follows,
    and dropped at the end when calls were made, so the deltas reassemble into `message_parts`."""

    stream: ToolCallStream
    parallel: bool = True
    num_calls: int = 0
    _held: str = ""
    _sent_text: bool = False
    _seen: set[int] = field(default_factory=set)

    def feed(self, delta: str, *, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        parts = [self.stream.feed(delta)]
        if finished:
            parts.append(self.stream.finish())
        content, calls = "", []
        for part in parts:
            content += part.content
            for call in part.tool_calls:
                if not self.parallel and call.index > 0:
                    continue
                self._seen.add(call.index)
                calls.append(call.to_openai())
        self.num_calls = len(self._seen)
        if content and not content.strip() and not self._sent_text:
            self._held += content
            content = ""
        elif content:
            content, self._held, self._sent_text = self._held + content, "", True
        if finished and self._held and (self._sent_text or not self.num_calls):
            content, self._held = content + self._held, ""
        return content, calls
