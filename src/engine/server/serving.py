"""The two generation endpoints: run a request on the engine, answer whole or as events.

Errors the engine raises before the first output (bad parameters, an over-long prompt, a
full queue, a dead engine) reach the client as HTTP errors even when streaming, because
the first output is awaited before the event stream starts. Errors after that arrive as a
final `data: {"error": ...}` event.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from shardline.engine.errors import PromptTooLongError
from shardline.engine.request import RequestOutput
from shardline.engine.server.engine_protocol import EngineLike
from shardline.engine.server.errors import APIError, api_error_from
from shardline.engine.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from shardline.engine.server.sampling import (
    build_sampling_params,
    chat_logprobs,
    check_completion_request,
    check_prompt_size,
    completion_logprobs,
    completion_prompt,
    context_length_error,
    count_prompt_tokens_off_loop,
    delta_logprobs,
    max_tokens_field,
)
from shardline.engine.server.streaming import EventStreamResponse, sse, unless_disconnected

log = logging.getLogger("shardline.server")

# Turns one engine output into the JSON of one streamed chunk (or None: nothing to send).
ChunkBuilder = Callable[[RequestOutput], str | None]


def usage_of(out: RequestOutput) -> UsageInfo:
    """Token counts of a request from its latest output."""
    return UsageInfo(
        prompt_tokens=out.num_prompt_tokens,
        completion_tokens=out.num_output_tokens,
        total_tokens=out.num_prompt_tokens + out.num_output_tokens,
    )


def _json_response(body: Any) -> Response:
    # pydantic writes non-finite floats (a -inf logprob) as null; json.dumps would fail.
    return Response(body.model_dump_json(), media_type="application/json")


class OpenAIServing:
    """Runs chat and completion requests on an engine for the HTTP routes."""

    def __init__(self, engine: EngineLike, *, served_model_name: str | Sequence[str]) -> None:
        self.engine = engine
        # Every name a request may use; responses report the first (--served-model-name A B).
        self.served_model_names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
        self.served_model_name = self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is absent or names the served model (any of its names)."""
        if model is not None and model not in self.served_model_names:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {', '.join(map(repr, self.served_model_names))}",
                param="model",
                code="model_not_found",
            )

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        """`POST /v1/chat/completions`."""
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self._check_size(messages, "messages")
        count = functools.partial(count_prompt_tokens_off_loop, self.engine.tokenizer, messages, chat=True)
        # Only a request without a token limit needs its prompt's length here (the default).
        num_prompt = await count() if max_tokens_field(req) is None else None
        params = build_sampling_params(req, num_prompt_tokens=num_prompt, max_model_len=self.engine.max_model_len)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        want_logprobs = req.logprobs
        tokenizer = self.engine.tokenizer
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        outputs = self.engine.chat(messages, params, request_id)

        def chunk(choice: ChatChunkChoice | None, usage: UsageInfo | None = None) -> str:
            return ChatCompletionChunk(
                id=request_id, created=created, model=self.served_model_name,
                choices=[choice] if choice is not None else [], usage=usage,
            ).model_dump_json()

        def content_chunk(out: RequestOutput) -> str | None:
            logprobs = None
            if want_logprobs:
                logprobs = chat_logprobs(tokenizer, delta_logprobs(out.logprobs, len(out.delta_token_ids)))
            if not out.delta and not out.finished and not (logprobs and logprobs.content):
                return None
            return chunk(ChatChunkChoice(delta=ChatDelta(content=out.delta), logprobs=logprobs,
                                         finish_reason=out.finish_reason if out.finished else None))

        first_events = [chunk(ChatChunkChoice(delta=ChatDelta(role="assistant", content="")))]
        async with self._naming_the_field(req, "messages", num_prompt, count):
            if not req.stream:
                final, entries = await self._collect(outputs, request_id, request)
                logprobs = ChatLogprobs(content=chat_logprobs(tokenizer, entries).content) if want_logprobs else None
                return _json_response(ChatCompletionResponse(
                    id=request_id, created=created, model=self.served_model_name,
                    choices=[ChatChoice(message=AssistantMessage(content=final.text), logprobs=logprobs,
                                        finish_reason=final.finish_reason)],
                    usage=usage_of(final),
                ))
            return await self._stream(
                outputs, request_id, request, first_events, content_chunk,
                usage_chunk=(lambda out: chunk(None, usage_of(out))) if include_usage else None,
            )

    # ------------------------------------------------------------------ completions
    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        """`POST /v1/completions`."""
        self.check_model(req.model)
        check_completion_request(req)
        prompt = completion_prompt(req)
        self._check_size(prompt, "prompt")
        count = functools.partial(count_prompt_tokens_off_loop, self.engine.tokenizer, prompt, chat=False)
        num_prompt = await count() if max_tokens_field(req) is None else None
        params = build_sampling_params(req, num_prompt_tokens=num_prompt, max_model_len=self.engine.max_model_len)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        want_logprobs = req.logprobs is not None
        tokenizer = self.engine.tokenizer
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        outputs = self.engine.generate(prompt, params, request_id)

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return CompletionResponse(
                id=request_id, created=created, model=self.served_model_name, choices=choices, usage=usage,
            ).model_dump_json()

        def text_chunk(out: RequestOutput) -> str | None:
            logprobs = None
            if want_logprobs:
                offset = len(out.text) - len(out.delta)
                logprobs = completion_logprobs(
                    tokenizer, delta_logprobs(out.logprobs, len(out.delta_token_ids)), text_offset=offset
                )
            if not out.delta and not out.finished and not (logprobs and logprobs.tokens):
                return None
            return chunk([CompletionChoice(text=out.delta, logprobs=logprobs,
                                           finish_reason=out.finish_reason if out.finished else None)])

        async with self._naming_the_field(req, "prompt", num_prompt, count):
            if not req.stream:
                final, entries = await self._collect(outputs, request_id, request)
                logprobs: CompletionLogprobs | None = None
                if want_logprobs:
                    logprobs = completion_logprobs(tokenizer, entries, text_offset=0)
                return _json_response(CompletionResponse(
                    id=request_id, created=created, model=self.served_model_name,
                    choices=[CompletionChoice(text=final.text, logprobs=logprobs, finish_reason=final.finish_reason)],
                    usage=usage_of(final),
                ))
            return await self._stream(
                outputs, request_id, request, [], text_chunk,
                usage_chunk=(lambda out: chunk([], usage_of(out))) if include_usage else None,
            )

    # ------------------------------------------------------------------ shared
    def _check_size(self, prompt: str | list[int] | list[dict[str, str]], field: str) -> None:
        """400 for a prompt too large to fit, told from its size before anything reads it."""
        check_prompt_size(prompt, field=field, max_model_len=self.engine.max_model_len,
                          max_prompt_chars=self.engine.max_prompt_chars)

    @contextlib.asynccontextmanager
    async def _naming_the_field(
        self, req: ChatCompletionRequest | CompletionRequest, prompt_field: str, num_prompt: int | None,
        count: Callable[[], Awaitable[int | None]],
    ) -> AsyncIterator[None]:
        """The engine's PromptTooLongError (raised before the first output, so before any
        event is sent) as a 400 naming the request field at fault: the token limit when the
        prompt fits, else the prompt (`prompt_field`). `count` measures the prompt if that
        was not needed before (`num_prompt` None)."""
        try:
            yield
        except PromptTooLongError as exc:
            if num_prompt is None:
                num_prompt = await count()
            raise context_length_error(
                exc, prompt_field=prompt_field, limit_field=max_tokens_field(req),
                num_prompt_tokens=num_prompt, max_model_len=self.engine.max_model_len,
            ) from exc

    async def _release(self, request_id: str, outputs: AsyncIterator[RequestOutput], *, abort: bool) -> None:
        """Close the request's output stream (aborting it first if unfinished).

        Shielded: this runs when the client's task is being cancelled, and the abort is what
        frees the request's KV blocks.
        """
        with anyio.CancelScope(shield=True):
            try:
                if abort:
                    await self.engine.abort(request_id)
            finally:
                aclose = getattr(outputs, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def _collect(
        self, outputs: AsyncIterator[RequestOutput], request_id: str, request: Request
    ) -> tuple[RequestOutput, list[Any]]:
        """Run a request to the end; returns its last output and every logprob entry."""
        entries: list[Any] = []

        async def run() -> RequestOutput:
            last: RequestOutput | None = None
            async for out in outputs:
                entries.extend(delta_logprobs(out.logprobs, len(out.delta_token_ids)))
                last = out
                if out.finished:
                    break
            if last is None or not last.finished:
                raise APIError(500, "the engine ended the request without a final output", type="server_error")
            return last

        finished = False
        try:
            final = await unless_disconnected(request, run)
            finished = True
        finally:
            await self._release(request_id, outputs, abort=not finished)
        if final.finish_reason == "error":
            raise APIError(500, f"generation failed: {final.error or 'unknown error'}", type="server_error",
                           code="generation_error")
        return final, entries

    async def _stream(
        self,
        outputs: AsyncIterator[RequestOutput],
        request_id: str,
        request: Request,
        first_events: list[str],
        build: ChunkBuilder,
        *,
        usage_chunk: ChunkBuilder | None,
    ) -> Response:
        try:
            first = await unless_disconnected(request, outputs.__anext__)
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the request without output", type="server_error") from None
        except BaseException:
            await self._release(request_id, outputs, abort=True)
            raise

        async def events() -> AsyncGenerator[str, Any]:
            done = False
            try:
                for event in first_events:
                    yield sse(event)
                out = first
                while True:
                    chunk_json = build(out)
                    if chunk_json is not None:
                        yield sse(chunk_json)
                    if out.finished:
                        done = True
                        break
                    out = await outputs.__anext__()
                if usage_chunk is not None and (usage_json := usage_chunk(out)) is not None:
                    yield sse(usage_json)
            except StopAsyncIteration:
                yield sse(json.dumps(APIError(500, "the engine ended the request early", type="server_error").body()))
            except Exception as exc:  # the engine died mid-stream: tell the client in-band
                log.warning("stream %s failed: %r", request_id, exc)
                yield sse(json.dumps(api_error_from(exc).body()))
            finally:
                await self._release(request_id, outputs, abort=not done)
            yield sse("[DONE]")

        return EventStreamResponse(events(), headers={"Cache-Control": "no-cache"})
