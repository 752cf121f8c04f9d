"""OpenAI wire format: the request bodies the server accepts and the bodies it answers with.

The fields shardline acts on are declared; the others are kept aside for
`sampling.check_other_fields` (refused by name when OpenAI or vLLM define them, else logged
once). The ranges below mirror `SamplingParams`'s own checks so the OpenAPI schema documents
them (and a schema-driven client or fuzzer produces valid requests); `SamplingParams` stays the
authority and checks them again.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from shardline.engine.request import LOGIT_BIAS_LIMIT, MAX_N

FinishReason = str
"""The engine's finish reason: "stop", "length", "abort" or "error"."""


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    """`stream_options`: whether the last streamed chunk carries `usage`."""

    include_usage: bool = False


class _SamplingFields(_Body):
    """The sampling fields shared by both endpoints (vLLM's extras included).

    Fields not declared here are kept (`model_extra`) so that `sampling.check_other_fields`
    can refuse the ones OpenAI or vLLM define and shardline does not honour yet, accept
    OpenAI's metadata-only ones, and log the rest once: nothing is dropped without a word."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, description="Served model name; default: the only one.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=2**63 - 1, description="-1 or 0: off")
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="a signed 64-bit integer")
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices to generate; they share the prompt's KV blocks")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = Field(default=None, description="vLLM: keep going past EOS tokens")
    stop_token_ids: list[TokenId] | None = Field(default=None, description="vLLM: ids that end the answer")
    skip_special_tokens: bool | None = Field(default=None, description="vLLM: leave special tokens out of the text")
    logit_bias: dict[str, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]] | None = Field(
        default=None, description="token id (a string of digits) -> bias added to its logit, in [-100, 100]"
    )
    min_tokens: int = Field(default=0, ge=0, description="vLLM: no EOS, stop id or stop string before this many tokens")
    include_stop_str_in_output: bool = Field(default=False, description="vLLM: keep the stop string that ended the text")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, description="vLLM: logprobs of the prompt's tokens and the top k at each (not when streaming)"
    )
    # Structured output (docs/STRUCTURED_OUTPUT.md): at most one of these; checked and mapped by
    # `structured_output.spec_from_request`, compiled before the answer starts (a schema feature
    # the grammar cannot enforce is a 400 naming the field).
    response_format: dict[str, Any] | None = Field(
        default=None, description='OpenAI: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}'
    )
    structured_outputs: dict[str, Any] | None = Field(
        default=None, description="vLLM: one of json, regex, choice, grammar (Lark or GBNF), json_object"
    )
    guided_json: Any = Field(default=None, description="vLLM (older spelling): a JSON schema")
    guided_regex: Any = Field(default=None, description="vLLM (older spelling): a regular expression")
    guided_choice: Any = Field(default=None, description="vLLM (older spelling): a list of strings")
    guided_grammar: Any = Field(default=None, description="vLLM (older spelling): a Lark or GBNF grammar")
    guided_decoding_backend: Any = Field(default=None, description="vLLM: 'auto', 'guidance' or 'llguidance' only")
    guided_whitespace_pattern: Any = Field(default=None, description="vLLM: whitespace regex of guided_json")


class ContentPart(_Body):
    """One part of a message's content: `{"type": "text", "text": ...}` is read (and an
    assistant's `refusal` part); other types are refused by `messages.message_text`."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    refusal: str | None = None


class ToolCallFunction(_Body):
    name: str
    arguments: str | dict[str, Any] | None = Field(default=None, description="JSON text, as OpenAI sends it")


class ToolCall(_Body):
    """A tool call an assistant message made (shown to the chat template)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    """One message of a conversation; `messages.template_messages` turns it into what the chat
    template reads."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(default=None, description="tool: the call this message answers")


class ChatCompletionRequest(_SamplingFields):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = Field(
        default=None, description='OpenAI: [{"type": "function", "function": {"name", "description", "parameters"}}]'
    )
    tool_choice: Any = Field(
        default=None,
        description='"none", "auto" (default with tools), "required" or {"type": "function", "function": {"name"}}',
    )
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one tool call (default true)")
    echo: bool = Field(default=False, description="vLLM: start the reply with the last message if it has the reply's role")
    add_generation_prompt: bool | None = Field(default=None, description="vLLM: open an assistant turn (default true)")
    continue_final_message: bool = Field(default=False, description="vLLM: continue the last message, left open")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="vLLM: variables for the chat template")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)  # the cap: --max-logprobs


class CompletionRequest(_SamplingFields):
    """Body of `POST /v1/completions`."""

    prompt: NonEmptyStr | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        description="a prompt (text or token ids) or a list of them; choice i*n+j answers prompt i"
    )
    max_tokens: int | None = Field(default=None, ge=0, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(default=None, ge=0)  # the cap: --max-logprobs
    echo: bool = Field(default=False, description="the prompt before each completion (with logprobs: its logprobs first)")
    best_of: int | None = Field(default=None, ge=1, le=MAX_N, description="only equal to n is supported")
    suffix: Literal[""] | None = Field(default=None, description="not supported")


# --- responses -------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    """One alternative token and its log-probability (chat format)."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """The sampled token, its log-probability and the most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """`choices[i].logprobs` of a chat response."""

    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    """`choices[i].logprobs` of a completion response (the legacy, column-wise format). With
    `echo` the prompt's tokens come first; the very first has no logprob (null)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's `Logprob`: one token of a prompt position (the prompt's own or a top one)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]
"""vLLM's `prompt_logprobs`: per prompt token, None for the first, else token id -> logprob."""


class _WithPromptLogprobs(BaseModel):
    """A response part with vLLM's `prompt_logprobs`, left out of the JSON unless asked for
    (every other None field stays null, as OpenAI writes them)."""

    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda value: value is None)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of an object


class ResponseToolCall(BaseModel):
    """A tool call the model made (`id` call_...)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The generated message of a chat choice; with tool calls its content is null unless the
    model wrote text beside them (`tool_calls` is left out when there are none)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = Field(default=None, exclude_if=lambda value: value is None)


class ChatChoice(BaseModel):
    """One choice of a non-streamed chat response."""

    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_WithPromptLogprobs):
    """Body answered by `POST /v1/chat/completions` without streaming."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    """What one streamed chunk adds to the assistant message.

    Fields that are None are left out of the JSON, as OpenAI does: the first chunk carries
    `role`, the others only `content` (no `"role": null`). Only the delta drops them; every
    other response keeps its None fields as null.
    """

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI's tool-call deltas: {"index", "id", "type", "function": {"name", "arguments"}}
    first, then {"index", "function": {"arguments"}} fragments."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat response."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(_WithPromptLogprobs):
    """One choice of a completion response or streamed chunk."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    """Body answered by `POST /v1/completions` (and each of its streamed chunks)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "shardline"
    max_model_len: int | None = None


class ModelList(BaseModel):
    """Body answered by `GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM's shape): a text `prompt`, or chat `messages` formatted by the
    model's template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """`POST /detokenize` (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    """The inside of an OpenAI error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error shape."""

    error: ErrorInfo
