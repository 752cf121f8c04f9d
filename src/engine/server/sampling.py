"""From an OpenAI request body to the engine's `SamplingParams`, and logprobs back to JSON.

Value checks stay in `SamplingParams` (one source of truth); this module only renames fields,
fills the defaults an OpenAI client expects, and refuses what shardline does not implement.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from shardline.engine.errors import InvalidRequestError, PromptTooLongError
from shardline.engine.model_info import chat_template_options
from shardline.engine.request import SamplingParams, TokenLogprob
from shardline.engine.server.errors import APIError
from shardline.engine.server.protocol import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)
from shardline.engine.structured_output import StructuredOutputSpec, spec_from_request

logger = logging.getLogger("shardline.serve")

_PASSTHROUGH = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens", "n", "logit_bias",
    "min_tokens", "include_stop_str_in_output", "prompt_logprobs",
)  # fmt: skip

MAX_PROMPTS = 1024
"""Prompts in one completions request (vLLM's default VLLM_MAX_COMPLETION_PROMPTS)."""
MAX_CHOICES = 1024
"""Choices in one request: prompts times `n` (each is a request in the engine's queue)."""

# Fields OpenAI's chat/completions API or vLLM's extensions define that shardline does not
# honour yet: a request that asks for one of them (a value other than "nothing") gets a 400
# naming it, never a 200 with behaviour it did not ask for.
# (`tools` and `tool_choice` are chat fields: declared there, refused here on completions.)
UNSUPPORTED_FIELDS = frozenset({
    "tools", "tool_choice", "functions", "function_call", "use_beam_search", "length_penalty", "truncate_prompt_tokens", "allowed_token_ids",
    "bad_words", "audio", "modalities", "prediction", "reasoning_effort", "web_search_options",
    "logits_processors", "chat_template", "documents", "mm_processor_kwargs", "priority",
    "return_tokens_as_token_ids", "spaces_between_special_tokens", "add_special_tokens", "kv_transfer_params",
    "vllm_xargs", "cache_salt", "thinking", "top_a", "typical_p", "n_probs", "verbosity", "request_id",
    "return_token_ids", "truncation_side", "logprob_token_ids", "thinking_token_budget", "include_reasoning",
    "watermarking", "repetition_detection", "stream_interval", "prompt_embeds", "media_io_kwargs",
    "ec_transfer_params", "return_token_offsets", "return_mm_kwargs", "routed_experts_prompt_start",
    "return_prompt_text",
})  # fmt: skip
# The value of each that asks for nothing beyond the default (accepted).
_NOTHING_ASKED: dict[str, Any] = {
    "spaces_between_special_tokens": True, "priority": 0, "tool_choice": "none", "typical_p": 1.0, "include_reasoning": True, "thinking_token_budget": -1,
    "return_mm_kwargs": True,
}
# OpenAI's metadata for its own service: accepted, no effect on the answer.
# (vLLM's session_id is a routing hint of the same kind.)
METADATA_FIELDS = frozenset({"user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
                             "session_id"})
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


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request (strings or token-id lists): one, or a list of them
    (at most MAX_PROMPTS, and MAX_CHOICES choices with `n`)."""
    prompt: Any = req.prompt
    prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list) else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"the prompt list has {len(prompts)} prompts, more than {MAX_PROMPTS}; send them in "
                       "several requests", param="prompt", code="invalid_value")  # fmt: skip
    check_choices(len(prompts), req.n)
    return prompts


def check_choices(num_prompts: int, n: int) -> None:
    """Refuse a request with more than MAX_CHOICES choices (prompts times n): 400 naming `n`."""
    if num_prompts * n > MAX_CHOICES:
        raise APIError(400, f"{num_prompts} prompts times n={n} is {num_prompts * n} choices, more than "
                       f"{MAX_CHOICES} in one request", param="n", code="invalid_value")  # fmt: skip


def check_completion_request(req: CompletionRequest) -> None:
    """Refuse the completion options shardline does not implement (400, naming the field)."""
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo=true, to score the prompt)",
                       param="max_tokens", code="invalid_value")  # fmt: skip
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of={req.best_of} with n={req.n}: only best_of equal to n is supported (no "
                       "ranking of extra candidates)", param="best_of", code="unsupported_value")  # fmt: skip


STRUCTURED_OUTPUT_FIELDS = (
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "guided_whitespace_pattern",
)  # fmt: skip


def structured_output_spec(req: ChatCompletionRequest | CompletionRequest) -> StructuredOutputSpec | None:
    """The structured output `req` asks for (OpenAI's `response_format`, vLLM's
    `structured_outputs` or its older `guided_*` fields; two at once are refused), or None.
    Only the fields' shapes are checked here: `Engine.compile_grammar` checks the schema or
    grammar itself."""
    body = {name: getattr(req, name) for name in STRUCTURED_OUTPUT_FIELDS}
    try:
        return spec_from_request(body)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=exc.field, code="invalid_value") from exc


def build_sampling_params(
    req: ChatCompletionRequest | CompletionRequest, *, num_prompt_tokens: int | None, max_model_len: int,
    structured_output: StructuredOutputSpec | None = None,
) -> SamplingParams:
    """The engine's parameters for `req`; InvalidRequestError names the HTTP field at fault.

    Without `max_tokens` the request may run to the end of the context (as OpenAI and vLLM
    do), so the prompt's length, when known, sets the default. `structured_output`: the
    grammar its output must follow (from `structured_output_spec`, or a tool-call grammar).
    """
    check_other_fields(req)
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs are not available when streaming (stream=true)",
                       param="prompt_logprobs", code="invalid_value")  # fmt: skip
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
        if req.echo and req.prompt_logprobs is None:
            kwargs["prompt_logprobs"] = req.logprobs  # the echoed prompt's logprobs come first (vLLM)
    if max_tokens is None:
        max_tokens = max(1, max_model_len - (num_prompt_tokens or 0))
    kwargs["max_tokens"] = max_tokens
    kwargs["structured_output"] = structured_output
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        renamed = {"max_tokens": max_tokens_field, "logprobs": logprobs_field}
        if req.prompt_logprobs is None:
            renamed["prompt_logprobs"] = logprobs_field  # set from logprobs for echo
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


def prompt_chars(prompt: str | Sequence[int] | list[dict[str, Any]]) -> int:
    """Characters of text in a prompt: the string's, or the messages' contents'; 0 for ids."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m["content"]) for m in prompt if isinstance(m, dict))


def check_prompt_size(
    prompt: str | Sequence[int] | list[dict[str, Any]], *, field: str, max_model_len: int, max_prompt_chars: int
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
    tokenizer: Any, prompt: str | Sequence[int] | list[dict[str, Any]], *, chat: bool,
    template_kwargs: Mapping[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
) -> int | None:
    """`count_prompt_tokens`, on a worker thread when the prompt is long enough to hold the
    event loop (over TOKENIZE_OFF_LOOP_CHARS characters)."""
    count = functools.partial(count_prompt_tokens, tokenizer, prompt, chat=chat, template_kwargs=template_kwargs,
                              tools=tools)
    if prompt_chars(prompt) > TOKENIZE_OFF_LOOP_CHARS:
        return await anyio.to_thread.run_sync(count)
    return count()


def count_prompt_tokens(
    tokenizer: Any, prompt: str | Sequence[int] | list[dict[str, Any]], *, chat: bool,
    template_kwargs: Mapping[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
) -> int | None:
    """Prompt length as the engine will see it, or None when it cannot be told here.

    Used for the default `max_tokens` and to name the field of a context-length error; a
    prompt that fails here fails again, with the engine's own error, when it is submitted.
    Runs the tokenizer (and the chat template) on the calling thread: long prompts go
    through `count_prompt_tokens_off_loop`.
    """
    try:
        if chat:
            options = chat_template_options(template_kwargs)
            if tools is not None:
                options["tools"] = tools
            ids = tokenizer.apply_chat_template(prompt, tokenize=True, **options)
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


def completion_logprobs(
    tokenizer: Any, entries: list[TokenLogprob], *, text_offset: int,
    prompt: tuple[Sequence[int], Sequence[TokenLogprob | None]] | None = None,
) -> CompletionLogprobs:
    """Logprobs in the legacy completions format (parallel lists); the generated tokens' offsets
    start at `text_offset`. `prompt` (echo): the prompt's ids and logprobs, listed first from
    offset 0; its first token has none (null), as in vLLM."""
    result = CompletionLogprobs()
    items: list[tuple[int, TokenLogprob | None, int | None]] = []
    if prompt is not None:
        items.extend((tid, entry, None) for tid, entry in zip(*prompt, strict=True))
    items.extend((entry.token_id, entry, text_offset if i == 0 else None) for i, entry in enumerate(entries))
    offset = 0
    for token_id, entry, start in items:
        offset = offset if start is None else start
        text = _token_text(tokenizer, token_id)
        result.tokens.append(text)
        result.token_logprobs.append(None if entry is None else entry.logprob)
        result.top_logprobs.append(None if entry is None else {_token_text(tokenizer, t): lp for t, lp in entry.top})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def prompt_logprobs_json(tokenizer: Any, entries: Sequence[TokenLogprob | None]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the prompt's own token and the top ones; a top token's rank is its
    place (1 = most likely), the prompt token's the engine's `rank` when it gives one, else its
    place among the top ones, else null."""
    result: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        places = {tid: place for place, (tid, _) in enumerate(entry.top, start=1)}
        rank = getattr(entry, "rank", None) or places.get(entry.token_id)
        position = {str(entry.token_id): PromptLogprob(logprob=entry.logprob, rank=rank,
                                                      decoded_token=_token_text(tokenizer, entry.token_id))}
        for place, (tid, lp) in enumerate(entry.top, start=1):
            position.setdefault(str(tid), PromptLogprob(logprob=lp, rank=place, decoded_token=_token_text(tokenizer, tid)))
        result.append(position)
    return result
