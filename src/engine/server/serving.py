"""The two generation endpoints: run a request on the engine, answer whole or as events.

Errors the engine raises before the first output (bad parameters, an over-long prompt, a
full queue, a dead engine) reach the client as HTTP errors even when streaming, because
every prompt's first output is awaited before the event stream starts. Errors after that
arrive as a final `data: {"error": ...}` event.

A request may have several choices (`n`, and a list of prompts on completions): they are read
together through `choices.ChoiceOutputs`, each answered under its own `index`; usage counts
each prompt once and every choice's tokens.
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

from starlette.requests import Request
from starlette.responses import Response

from shardline.engine.errors import InvalidRequestError, PromptTooLongError
from shardline.engine.model_info import chat_template_options
from shardline.engine.request import RequestOutput, SamplingParams, TokenLogprob
from shardline.engine.server.choices import ChoiceOutputs, PromptRun
from shardline.engine.server.engine_protocol import EngineLike
from shardline.engine.server.errors import APIError, api_error_from
from shardline.engine.server.messages import echo_text, template_kwargs, template_messages
from shardline.engine.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    ResponseToolCall,
    UsageInfo,
)
from shardline.engine.server.sampling import (
    build_sampling_params,
    chat_logprobs,
    check_completion_request,
    check_prompt_size,
    completion_logprobs,
    completion_prompts,
    context_length_error,
    count_prompt_tokens_off_loop,
    delta_logprobs,
    max_tokens_field,
    prompt_logprobs_json,
    structured_output_spec,
)
from shardline.engine.server.streaming import EventStreamResponse, sse, unless_disconnected
from shardline.engine.server.tools import (
    DEFAULT_TOOL_CALL_PARSER,
    ToolCallOutput,
    finish_reason_of,
    message_parts,
    plan_tools,
)
from shardline.engine.structured_output import StructuredOutputSpec

log = logging.getLogger("shardline.server")

# Turns one engine output of a choice into the JSON of one streamed chunk (or None: nothing
# to send); its arguments are the choice index, the output and whether it is the choice's first.
ChunkBuilder = Callable[[int, RequestOutput, bool], str | None]


class Collected:
    """Every choice of a request run to the end: its last output and its logprob entries."""

    def __init__(self) -> None:
        self.finals: dict[int, RequestOutput] = {}
        self.entries: dict[int, list[TokenLogprob]] = {}

    def add(self, choice: int, out: RequestOutput) -> None:
        self.entries.setdefault(choice, []).extend(delta_logprobs(out.logprobs, len(out.delta_token_ids)))
        if out.finished:
            self.finals[choice] = out

    def choices(self) -> list[tuple[int, RequestOutput, list[TokenLogprob]]]:
        return [(c, self.finals[c], self.entries.get(c, [])) for c in sorted(self.finals)]


def usage_of(stream: ChoiceOutputs, finals: Sequence[RequestOutput]) -> UsageInfo:
    """Token counts of a request: each prompt once, every choice's generated tokens."""
    prompt_tokens = sum(run.num_prompt_tokens for run in stream.runs)
    completion_tokens = sum(out.num_output_tokens for out in finals)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _json_response(body: Any) -> Response:
    # pydantic writes non-finite floats (a -inf logprob) as null; json.dumps would fail.
    return Response(body.model_dump_json(), media_type="application/json")


class OpenAIServing:
    """Runs chat and completion requests on an engine for the HTTP routes."""

    def __init__(
        self, engine: EngineLike, *, served_model_name: str | Sequence[str],
        tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER,
    ) -> None:
        self.engine = engine
        self.tool_call_parser = tool_call_parser
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
        messages = template_messages(req)
        kwargs = template_kwargs(req)
        options = chat_template_options(kwargs)  # refuses bad chat_template_kwargs by name
        if options.get("continue_final_message") and options.get("add_generation_prompt"):
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: one "
                           "continues the last message, the other starts a new one",
                           param="continue_final_message", code="invalid_value")  # fmt: skip
        self._check_size(messages, "messages")
        structured = structured_output_spec(req)
        plan = await plan_tools(req, messages, chat_template=getattr(self.engine.tokenizer, "chat_template", None),
                                parser_name=self.tool_call_parser, structured=structured,
                                compile_grammar=self.engine.compile_grammar)
        messages = plan.messages
        spec = plan.spec or structured
        await self._compile(spec)
        count = functools.partial(count_prompt_tokens_off_loop, self.engine.tokenizer, messages, chat=True,
                                  template_kwargs=kwargs, tools=plan.tools)
        # Only a request without a token limit needs its prompt's length here (the default).
        num_prompt = await count() if max_tokens_field(req) is None else None
        params = build_sampling_params(req, num_prompt_tokens=num_prompt, max_model_len=self.engine.max_model_len,
                                       structured_output=spec)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        want_logprobs = req.logprobs
        tokenizer = self.engine.tokenizer
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = echo_text(messages, add_generation_prompt=options["add_generation_prompt"]) if req.echo else ""
        stream = self._choices([(request_id, self.engine.chat(messages, params, request_id,
                                                              chat_template_kwargs=kwargs, tools=plan.tools))], req.n)
        parser = plan.parser
        tool_outputs: dict[int, ToolCallOutput] = {}

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
            return ChatCompletionChunk(
                id=request_id, created=created, model=self.served_model_name, choices=choices, usage=usage,
            ).model_dump_json()

        def content_chunk(choice: int, out: RequestOutput, first: bool) -> str | None:
            logprobs = None
            if want_logprobs:
                logprobs = chat_logprobs(tokenizer, delta_logprobs(out.logprobs, len(out.delta_token_ids)))
            content: str | None = out.delta
            tool_calls = None
            finish_reason = out.finish_reason if out.finished else None
            if parser is not None:
                reader = tool_outputs.setdefault(choice, ToolCallOutput(parser.stream(), parallel=plan.parallel))
                content, calls = reader.feed(out.delta, finished=out.finished)
                tool_calls = calls or None
                finish_reason = finish_reason_of(finish_reason, reader.num_calls)
                if not content and tool_calls:
                    content = None  # OpenAI's tool-call deltas carry no content
            if not content and not tool_calls and not out.finished and not (logprobs and logprobs.content):
                return None
            return chunk([ChatChunkChoice(index=choice, delta=ChatDelta(content=content, tool_calls=tool_calls),
                                          logprobs=logprobs, finish_reason=finish_reason)])

        def message(final: RequestOutput) -> tuple[AssistantMessage, str | None]:
            if parser is None:
                return AssistantMessage(content=echo + final.text), final.finish_reason
            content, calls = message_parts(parser, final.text, parallel=plan.parallel)
            if echo:  # vLLM's echo leads the content, as it leads the stream
                content = echo + (content or "")
            tool_calls = [ResponseToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                          for c in calls]
            return (AssistantMessage(content=content, tool_calls=tool_calls or None),
                    finish_reason_of(final.finish_reason, len(calls)))

        # The role first, once per choice (with vLLM's echo as its content), as OpenAI does.
        first_events = [chunk([ChatChunkChoice(index=c, delta=ChatDelta(role="assistant", content=echo))])
                        for c in range(req.n)]
        async with self._naming_the_field(req, "messages", stream, lambda _: count()):
            if not req.stream:
                result = await self._collect(stream, request)
                choices = [
                    ChatChoice(index=c, message=msg, finish_reason=reason,
                               logprobs=chat_logprobs(tokenizer, entries) if want_logprobs else None)
                    for c, final, entries in result.choices()
                    for msg, reason in [message(final)]
                ]
                prompt_logprobs = stream.runs[0].prompt_logprobs
                return _json_response(ChatCompletionResponse(
                    id=request_id, created=created, model=self.served_model_name, choices=choices,
                    usage=usage_of(stream, list(result.finals.values())),
                    prompt_logprobs=prompt_logprobs_json(tokenizer, prompt_logprobs)
                    if req.prompt_logprobs is not None and prompt_logprobs is not None else None,
                ))
            return await self._stream(
                stream, request, first_events, content_chunk,
                usage_chunk=(lambda finals: chunk([], usage_of(stream, finals))) if include_usage else None,
            )

    # ------------------------------------------------------------------ completions
    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        """`POST /v1/completions`: one prompt or a list; choice i*n+j answers prompt i."""
        self.check_model(req.model)
        check_completion_request(req)
        # echo with max_tokens 0 scores the prompt (OpenAI's; lm-eval's loglikelihood): the
        # engine generates one token, which the answer leaves out.
        scoring = req.echo and req.max_tokens == 0
        if scoring:
            req = req.model_copy(update={"max_tokens": 1})
        prompts = completion_prompts(req)
        for prompt in prompts:
            self._check_size(prompt, "prompt")
        spec = structured_output_spec(req)
        await self._compile(spec)
        tokenizer = self.engine.tokenizer

        def count(i: int) -> Awaitable[int | None]:
            return count_prompt_tokens_off_loop(tokenizer, prompts[i], chat=False)

        params_of: dict[int | None, SamplingParams] = {}  # by prompt length (only without max_tokens)
        engine_requests = []
        request_id = f"cmpl-{uuid.uuid4().hex}"
        for i, prompt in enumerate(prompts):
            num_prompt = await count(i) if max_tokens_field(req) is None else None
            if num_prompt not in params_of:
                params_of[num_prompt] = build_sampling_params(req, num_prompt_tokens=num_prompt,
                                                              max_model_len=self.engine.max_model_len,
                                                              structured_output=spec)
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            engine_requests.append((rid, self.engine.generate(prompt, params_of[num_prompt], rid)))
        stream = self._choices(engine_requests, req.n)
        created = int(time.time())
        want_logprobs = req.logprobs is not None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echoes = [self._prompt_text(p) for p in prompts] if req.echo else None

        def shown(choice: int, text: str, entries: list[TokenLogprob], *, first: bool,
                  offset: int) -> tuple[str, CompletionLogprobs | None]:
            """A choice's `text` (starting at `offset` of its completion) and its logprobs; with
            echo, the prompt and its logprobs come first in the choice's first piece."""
            run = stream.runs[choice // req.n]
            echo = echoes[run.index] if echoes is not None else ""
            prompt_part = None
            if echo and first and run.prompt_logprobs is not None:
                ids = [e.token_id if e is not None else self._first_prompt_id(prompts[run.index])
                       for e in run.prompt_logprobs]
                prompt_part = (ids, run.prompt_logprobs)
            if scoring:
                text, entries = "", []
            logprobs = None
            if want_logprobs:
                logprobs = completion_logprobs(tokenizer, entries, text_offset=len(echo) + offset, prompt=prompt_part)
            return (echo + text if first else text), logprobs

        def usage(finals: list[RequestOutput]) -> UsageInfo:
            return usage_of(stream, [] if scoring else finals)

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return CompletionResponse(
                id=request_id, created=created, model=self.served_model_name, choices=choices, usage=usage,
            ).model_dump_json()

        def text_chunk(choice: int, out: RequestOutput, first: bool) -> str | None:
            entries = delta_logprobs(out.logprobs, len(out.delta_token_ids)) if want_logprobs else []
            text, logprobs = shown(choice, out.delta, entries, first=first, offset=len(out.text) - len(out.delta))
            if not text and not out.finished and not (logprobs and logprobs.tokens):
                return None
            return chunk([CompletionChoice(index=choice, text=text, logprobs=logprobs,
                                           finish_reason=out.finish_reason if out.finished else None)])

        async with self._naming_the_field(req, "prompt", stream, count):
            if not req.stream:
                result = await self._collect(stream, request)
                choices = []
                for c, final, entries in result.choices():
                    text, logprobs = shown(c, final.text, entries, first=True, offset=0)
                    run = stream.runs[c // req.n]
                    choices.append(CompletionChoice(
                        index=c, text=text, logprobs=logprobs, finish_reason=final.finish_reason,
                        prompt_logprobs=prompt_logprobs_json(tokenizer, run.prompt_logprobs)
                        if req.prompt_logprobs is not None and run.prompt_logprobs is not None else None,
                    ))
                return _json_response(CompletionResponse(
                    id=request_id, created=created, model=self.served_model_name, choices=choices,
                    usage=usage(list(result.finals.values())),
                ))
            return await self._stream(
                stream, request, [], text_chunk,
                usage_chunk=(lambda finals: chunk([], usage(finals))) if include_usage else None,
            )

    # ------------------------------------------------------------------ shared
    async def _compile(self, spec: StructuredOutputSpec | None) -> None:
        """Compile a request's grammar before anything is submitted, so that a schema or grammar
        the engine cannot enforce is a 400 naming its field (the engine caches it for the run)."""
        if spec is None:
            return
        try:
            await self.engine.compile_grammar(spec)
        except InvalidRequestError as exc:
            raise api_error_from(exc) from exc

    def _prompt_text(self, prompt: str | list[int]) -> str:
        """The prompt as `echo` shows it: the text itself, or its token ids decoded."""
        return prompt if isinstance(prompt, str) else str(self.engine.tokenizer.decode(prompt))

    def _first_prompt_id(self, prompt: str | list[int]) -> int:
        """The id of the prompt's first token (it has no logprob entry of its own)."""
        ids = prompt if isinstance(prompt, list) else self.engine.tokenizer.encode(prompt)
        return int(ids[0])

    def _choices(self, engine_requests: list[tuple[str, AsyncIterator[RequestOutput]]], n: int) -> ChoiceOutputs:
        runs = [PromptRun(index=i, request_id=rid, outputs=outputs, remaining=n)
                for i, (rid, outputs) in enumerate(engine_requests)]
        return ChoiceOutputs(runs, n=n, abort=self.engine.abort)

    def _check_size(self, prompt: str | list[int] | list[dict[str, Any]], field: str) -> None:
        """400 for a prompt too large to fit, told from its size before anything reads it."""
        check_prompt_size(prompt, field=field, max_model_len=self.engine.max_model_len,
                          max_prompt_chars=self.engine.max_prompt_chars)

    @contextlib.asynccontextmanager
    async def _naming_the_field(
        self, req: ChatCompletionRequest | CompletionRequest, prompt_field: str, stream: ChoiceOutputs,
        count: Callable[[int], Awaitable[int | None]],
    ) -> AsyncIterator[None]:
        """The engine's refusals (raised before the first output, so before any event is
        sent) in the request's terms: PromptTooLongError as a 400 naming the token limit when
        the prompt fits, else the prompt (`prompt_field`); with several prompts, an error of
        one of them names its index. `count(i)` measures prompt i."""
        try:
            yield
        except PromptTooLongError as exc:
            error = context_length_error(
                exc, prompt_field=prompt_field, limit_field=max_tokens_field(req),
                num_prompt_tokens=await count(stream.failed_prompt or 0), max_model_len=self.engine.max_model_len,
            )
            raise self._naming_the_prompt(error, stream) from exc
        except InvalidRequestError as exc:
            raise self._naming_the_prompt(api_error_from(exc), stream) from exc
        except APIError as exc:
            raise self._naming_the_prompt(exc, stream) from None

    @staticmethod
    def _naming_the_prompt(error: APIError, stream: ChoiceOutputs) -> APIError:
        if len(stream.runs) > 1 and stream.failed_prompt is not None and error.status_code == 400:
            error.message = f"prompt {stream.failed_prompt}: {error.message}"
        return error

    async def _collect(self, stream: ChoiceOutputs, request: Request) -> Collected:
        """Run every choice to the end."""
        result = Collected()

        async def run() -> Collected:
            for choice, out in await stream.start():
                result.add(choice, out)
            async for choice, out in stream:
                result.add(choice, out)
            return result

        try:
            await unless_disconnected(request, run)
        finally:
            await stream.aclose()
        for final in result.finals.values():
            if final.finish_reason == "error":
                raise APIError(500, f"generation failed: {final.error or 'unknown error'}", type="server_error",
                               code="generation_error")
        return result

    async def _stream(
        self,
        stream: ChoiceOutputs,
        request: Request,
        first_events: list[str],
        build: ChunkBuilder,
        *,
        usage_chunk: Callable[[list[RequestOutput]], str] | None,
    ) -> Response:
        try:
            firsts = await unless_disconnected(request, stream.start)
        except BaseException:
            await stream.aclose()
            raise

        async def events() -> AsyncGenerator[str, Any]:
            finals: list[RequestOutput] = []
            started: set[int] = set()

            def event(choice: int, out: RequestOutput) -> str | None:
                first = choice not in started
                started.add(choice)
                if out.finished:
                    finals.append(out)
                chunk_json = build(choice, out, first)
                return None if chunk_json is None else sse(chunk_json)

            try:
                for item in first_events:
                    yield sse(item)
                for choice, out in firsts:
                    if (sent := event(choice, out)) is not None:
                        yield sent
                async for choice, out in stream:
                    if (sent := event(choice, out)) is not None:
                        yield sent
                if usage_chunk is not None:
                    yield sse(usage_chunk(finals))
            except Exception as exc:  # the engine died mid-stream: tell the client in-band
                log.warning("stream %s failed: %r", stream.runs[0].request_id, exc)
                yield sse(json.dumps(api_error_from(exc).body()))
            finally:
                await stream.aclose()
            yield sse("[DONE]")

        return EventStreamResponse(events(), headers={"Cache-Control": "no-cache"})
