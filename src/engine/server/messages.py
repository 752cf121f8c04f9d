"""Chat messages as the chat template reads them, from OpenAI's message shapes.

Content may be a string or a list of parts: text parts (`text`, and an assistant's `refusal`)
are joined with newlines as vLLM joins them; an image, audio or file part is refused with a
400 naming `messages` (the model takes text only). Assistant messages may carry `tool_calls`
(their content may then be null) and tool messages a `tool_call_id`; both reach the template as
transformers' `apply_chat_template` expects them, with each call's `arguments` parsed from the
JSON string OpenAI sends into the object templates read (vLLM does the same).
"""

from __future__ import annotations

import json
from typing import Any

from shardline.engine.server.errors import APIError
from shardline.engine.server.protocol import ChatCompletionRequest, ChatMessage, ContentPart

# Part types whose text is the message's text (vLLM reads these as text too).
TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
}
# Part types OpenAI or vLLM define for other modalities: refused, this server runs text models.
MEDIA_PART_TYPES = frozenset({
    "image_url", "input_image", "image_embeds", "image_pil", "input_audio", "audio_url", "audio_embeds",
    "video_url", "file", "input_file",
})  # fmt: skip


def _part_text(part: ContentPart, where: str) -> str:
    field = TEXT_PART_FIELDS.get(part.type)
    if field is None:
        if part.type in MEDIA_PART_TYPES:
            raise APIError(400, f"{where} is a {part.type!r} part: this model takes text only (content parts of "
                           "type 'text')", param="messages", code="unsupported_content")  # fmt: skip
        raise APIError(400, f"{where} has an unknown content part type {part.type!r}; this server takes "
                       "parts of type 'text'", param="messages", code="invalid_value")  # fmt: skip
    text = getattr(part, field, None)
    if not isinstance(text, str):
        raise APIError(400, f"{where} of type {part.type!r} needs a string {field!r}", param="messages",
                       code="invalid_value")  # fmt: skip
    return text


def message_text(message: ChatMessage, index: int) -> str:
    """The message's content as one string: text parts joined with newlines ("" for null)."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(
        _part_text(part, f"messages[{index}].content[{i}]") for i, part in enumerate(content)
    )


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise APIError(400, f"{where}.function.arguments is not valid JSON: {exc}", param="messages",
                           code="invalid_value") from exc  # fmt: skip
    elif arguments is None:
        arguments = {}
    result: dict[str, Any] = {
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }
    if call.id is not None:
        result["id"] = call.id
    return result


def template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the chat template reads them (see the module docstring)."""
    messages = []
    for i, message in enumerate(req.messages):
        entry: dict[str, Any] = {"role": message.role, "content": message_text(message, i)}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            if message.role != "assistant":
                raise APIError(400, f"messages[{i}] has tool_calls but its role is {message.role!r}; only "
                               "assistant messages make tool calls", param="messages", code="invalid_value")  # fmt: skip
            entry["tool_calls"] = [
                _tool_call(c, f"messages[{i}].tool_calls[{j}]")
                for j, c in enumerate(message.tool_calls)
            ]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    return messages


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """What `Engine.chat` passes to the template besides the messages: the request's
    `add_generation_prompt` / `continue_final_message` when set, then its
    `chat_template_kwargs` over them (vLLM's order); None when there is nothing."""
    kwargs: dict[str, Any] = {}
    if req.add_generation_prompt is not None:
        kwargs["add_generation_prompt"] = req.add_generation_prompt
    if req.continue_final_message:
        kwargs["continue_final_message"] = True
    kwargs.update(req.chat_template_kwargs or {})
    return kwargs or None


def echo_text(messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    """vLLM's chat `echo`: the last message's content when its role is the reply's role
    (assistant, or without a generation prompt the last message's own), else ""."""
    role = "assistant" if add_generation_prompt else messages[-1]["role"]
    return str(messages[-1]["content"]) if messages[-1]["role"] == role else ""
