"""From an OpenAI request body to the engine's `SamplingParams`, and logprobs back to JSON.

Value checks stay in `SamplingParams` (one source of truth); this module only renames fields,
fills the defaults an OpenAI client expects, and refuses what shardline does not implement.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import anyio

from shardline.engine.errors import InvalidRequestError, PromptTooLongError
from shardline.engine.request import SamplingParams, TokenLogprob
from shardline.engine.server.errors import APIError
from shardline.engine.server.protocol import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    TopLogprob,
)

logger = logging.getLogger("shardline.serve")

_PASSTHROUGH = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens",
)  # fmt: skip

# Fields OpenAI's chat/completions API or vLLM's extensions define that shardline does not
# honour yet: a request that asks for one of them (a value other than "nothing") gets a 400
# naming it, never a 200 with behaviour it did not ask for.
UNSUPPORTED_FIELDS = frozenset({
    "logit_bias", "min_tokens", "response_format", "tools", "tool_choice", "functions", "function_call",
    "prompt_logprobs", "include_stop_str_in_output", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern", "structured_outputs",
    "use_beam_search", "length_penalty", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
    "audio", "modalities", "prediction", "reasoning_effort", "web_search_options", "logits_processors",
    "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
    "documents", "mm_processor_kwargs", "priority", "return_tokens_as_token_ids",
    "spaces_between_special_tokens", "add_special_tokens", "echo", "kv_transfer_params",
    "vllm_xargs", "cache_salt", "thinking", "top_a", "typical_p", "n_probs",
})  # fmt: skip
# The value of each that asks for nothing beyond the default (accepted).
_NOTHING_ASKED: dict[str, Any] = {
    "add_generation_prompt": True, "spaces_between_special_tokens": True, "priority": 0,
    "response_format": {"type": "text"}, "tool_choice": "none", "typical_p": 1.0,
}
# OpenAI's metadata for its own service: accepted, no effect on the answer.
METADATA_FIELDS = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls"})
_logged_unknown: set[str] = set()


def check_other_fields(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse a field shardline does not honour (400 `unsupported_parameter` naming it);
    accept metadata; log once, as vLLM does, a field that neither OpenAI nor vLLM defines."""
    for name, value in (req.model_extra or {}).items():
        if name in METADATA_FIELDS:
            continue
        if name in UNSUPPORTED_FIELDS:
            default = _NOTHING_ASKED.get(name, None)
            if value is None or value == default or (default is None and value in (False, 0, "", [], {})):
                continue
            raise APIError(400, f"'{name}' is not supported by this server (yet); leave it out",
                           param=name, code="unsupported_parameter")
        if name not in _logged_unknown:
            _logged_unknown.add(name)
            logger.warning("ignoring request field %r: neither OpenAI nor vLLM defines it", name)


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request (a string or token ids)."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(
                400,
                f"batched prompts are not supported (got {len(prompt)}); send one request per prompt",
                param="prompt",
                code="unsupported_value",
            )
        prompt = prompt[0]
    return prompt  # type: ignore[no-any-return]


def check_completion_request(req: CompletionRequest) -> None:
    """Refuse the completion options shardline does not implement (400, naming the field)."""
    if req.echo:
        raise APIError(400, "echo=true is not supported", param="echo", code="unsupported_value")
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
    if req.best_of not in (None, 1):
        raise APIError(400, f"only best_of=1 is supported, got {req.best_of}", param="best_of", code="unsupported_value")


def build_sampling_params(
    req: ChatCompletionRequest | CompletionRequest, *, num_prompt_tokens: int | None, max_model_len: int
) -> SamplingParams:
    """The engine's parameters for `req`; InvalidRequestError names the HTTP field at fault.

    Without `max_tokens` the request may run to the end of the context (as OpenAI and vLLM
    do), so the prompt's length, when known, sets the default.
    """
    check_other_fields(req)
    if req.n != 1:
        raise APIError(400, f"only n=1 is supported (one choice per request), got n={req.n}", param="n", code="unsupported_value")
    kwargs: dict[str, Any] = {name: getattr(req, name) for name in _PASSTHROUGH if getattr(req, name) is not None}
    if req.stop is not None:
        kwargs["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    max_tokens_field = "max_tokens"
    max_tokens = req.max_tokens
    logprobs_field = "logprobs"
    if isinstance(req, ChatCompletionRequest):
        if req.max_completion_tokens is not None:
            max_tokens, max_tokens_field = req.max_completion_tokens, "max_completion_tokens"
        if req.logprobs:
            kwargs["logprobs"] = req.top_logprobs or 0
            logprobs_field = "top_logprobs"
        elif req.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    elif req.logprobs is not None:
        kwargs["logprobs"] = req.logprobs
    if max_tokens is None:
        max_tokens = max(1, max_model_len - (num_prompt_tokens or 0))
    kwargs["max_tokens"] = max_tokens
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        renamed = {"max_tokens": max_tokens_field, "logprobs": logprobs_field}
        raise APIError(400, str(exc), param=renamed.get(exc.field, exc.field), code="invalid_value") from exc


def max_tokens_field(req: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The field the request set its token limit with (`max_completion_tokens` wins on chat, as
    in `build_sampling_params`), or None when it left the limit to the context's end."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens" if req.max_tokens is not None else None


def context_length_error(
    exc: PromptTooLongError,
    *,
    prompt_field: str,
    limit_field: str | None,
    num_prompt_tokens: int | None,
    max_model_len: int,
) -> APIError:
    """The engine's context-length refusal as a 400 naming the field at fault.

    The engine only knows "the prompt"; here the request is known. When the prompt fits and
    the request set a token limit (`limit_field`), the limit is what is too large (the engine
    refuses prompt + max_tokens over max_model_len); otherwise the prompt is, named as the
    request names it (`prompt_field`: `messages` on chat, `prompt` on completions).
    """
    prompt_fits = num_prompt_tokens is not None and num_prompt_tokens < max_model_len
    if limit_field is not None and prompt_fits:
        message = exc.message.replace("max_tokens", limit_field)
        return APIError(400, f"invalid {limit_field}: {message}", param=limit_field,
                        code="context_length_exceeded")  # fmt: skip
    return APIError(400, f"invalid {prompt_field}: {exc.message}", param=prompt_field,
                    code="context_length_exceeded")  # fmt: skip


TOKENIZE_OFF_LOOP_CHARS = 16_384
"""Prompts with more characters than this are tokenized (or rendered) on a worker thread, so
the event loop keeps serving meanwhile (the engine's own threshold, `engine.api`)."""


def prompt_chars(prompt: str | Sequence[int] | list[dict[str, str]]) -> int:
    """Characters of text in a prompt: the string's, or the messages' contents'; 0 for ids."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m["content"]) for m in prompt if isinstance(m, dict))


def check_prompt_size(
    prompt: str | Sequence[int] | list[dict[str, str]], *, field: str, max_model_len: int, max_prompt_chars: int
) -> None:
    """Refuse a prompt that cannot fit from its size alone, before anything reads it (400,
    naming `field`): more characters than `max_prompt_chars`, or more token ids than
    `max_model_len`. Tokenizing a 4 MB text to find out costs seconds of CPU and ~1 GB."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], dict):
        if len(prompt) >= max_model_len:  # not even one token left to generate
            raise APIError(400, f"invalid {field}: the prompt has {len(prompt)} tokens but the model's "
                           f"context length (max_model_len) is {max_model_len}; at least one token must be "
                           "left to generate", param=field, code="context_length_exceeded")  # fmt: skip
        return
    chars = prompt_chars(prompt)
    if chars > max_prompt_chars:
        raise APIError(400, f"invalid {field}: the prompt has {chars} characters, more than "
                       f"{max_prompt_chars} (max_model_len {max_model_len} tokens, and no token of this "
                       "model spans more than the longest entry of its vocabulary)",
                       param=field, code="context_length_exceeded")  # fmt: skip


async def count_prompt_tokens_off_loop(
    tokenizer: Any, prompt: str | Sequence[int] | list[dict[str, str]], *, chat: bool
) -> int | None:
    """`count_prompt_tokens`, on a worker thread when the prompt is long enough to hold the
    event loop (over TOKENIZE_OFF_LOOP_CHARS characters)."""
    if prompt_chars(prompt) > TOKENIZE_OFF_LOOP_CHARS:
        return await anyio.to_thread.run_sync(functools.partial(count_prompt_tokens, tokenizer, prompt, chat=chat))
    return count_prompt_tokens(tokenizer, prompt, chat=chat)


def count_prompt_tokens(tokenizer: Any, prompt: str | Sequence[int] | list[dict[str, str]], *, chat: bool) -> int | None:
    """Prompt length as the engine will see it, or None when it cannot be told here.

    Used for the default `max_tokens` and to name the field of a context-length error; a
    prompt that fails here fails again, with the engine's own error, when it is submitted.
    Runs the tokenizer (and the chat template) on the calling thread: long prompts go
    through `count_prompt_tokens_off_loop`.
    """
    try:
        if chat:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            return len(ids)
        if isinstance(prompt, str):
            # With the tokenizer's special tokens, as the engine. (shardline's FastTokenizer
            # encodes through the Rust batch call, which lets go of the GIL on a thread.)
            return len(tokenizer.encode(prompt))
        return len(prompt)
    except Exception:
        return None


def _token_text(tokenizer: Any, token_id: int) -> str:
    try:
        return str(tokenizer.decode([token_id]))
    except Exception:
        return f"<token {token_id}>"


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def delta_logprobs(logprobs: list[TokenLogprob] | None, num_delta_tokens: int) -> list[TokenLogprob]:
    """The entries of an output's logprobs that belong to its new tokens."""
    if not logprobs or num_delta_tokens <= 0:
        return []
    return logprobs[-num_delta_tokens:]


def chat_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> ChatLogprobs:
    """Logprobs in the chat format: one object per token with its top alternatives."""
    content = []
    for entry in entries:
        text = _token_text(tokenizer, entry.token_id)
        top = [
            TopLogprob(token=(alt := _token_text(tokenizer, tid)), logprob=lp, bytes=_utf8(alt))
            for tid, lp in entry.top
        ]
        content.append(ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=_utf8(text), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: Any, entries: list[TokenLogprob], *, text_offset: int) -> CompletionLogprobs:
    """Logprobs in the legacy completions format (parallel lists); offsets start at `text_offset`."""
    result = CompletionLogprobs()
    offset = text_offset
    for entry in entries:
        text = _token_text(tokenizer, entry.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({_token_text(tokenizer, tid): lp for tid, lp in entry.top})
        result.text_offset.append(offset)
        offset += len(text)
    return result
