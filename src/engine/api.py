"""Engine: the public, embeddable face of shardline.

    async with await Engine.start(EngineConfig(...)) as engine:
        async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
            print(out.delta, end="")

`Engine.start` runs inside the caller's event loop: it starts one owned task (the engine's
supervisor) that holds a task group with the executor's reader and monitor and the
EngineCore loop. Model work happens in worker processes, so the caller's loop stays responsive.
Cancelling the task that consumes `generate` aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio

from shardline.engine.config import EngineConfig
from shardline.engine.core import EngineCore, EngineStats
from shardline.engine.detokenizer import IncrementalDetokenizer
from shardline.engine.draft_model import DraftModelProposer
from shardline.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    PromptTooLongError,
)
from shardline.engine.executor import Executor
from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.model_info import (
    ModelInfo,
    ModelLocation,
    check_logprobs_cap,
    load_model_info,
    locate_model,
)
from shardline.engine.output_stream import END_OF_STREAM, OutputStream
from shardline.engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    validate_request,
)
from shardline.engine.scheduler import Scheduler, SchedulerConfig
from shardline.engine.stats_logger import StatsLogger
from shardline.engine.structured_output import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarMatcher,
    StructuredOutputSpec,
)

logger = logging.getLogger("shardline.engine")


class Engine:
    """An LLM inference engine living in the caller's event loop. Build with `Engine.start`."""

    def __init__(self, config: EngineConfig, location: ModelLocation) -> None:
        self.config = config
        self._location = location
        self._info: ModelInfo = None  # type: ignore[assignment]  # set by `start` before it returns
        self._cores: list[EngineCore] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._death: BaseException | None = None
        # Requests with n > 1 by the caller's id, so that `abort(id)` reaches every choice
        # (weakly: a dropped iterator is collected, and its __del__ aborts its choices).
        self._parallel: weakref.WeakValueDictionary[str, ParallelRequestOutputs] = weakref.WeakValueDictionary()
        # Structured output: built on first use (llguidance's tokenizer set-up takes ~0.5 s,
        # which an engine that never sees a grammar should not pay at start).
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_compiler_lock = threading.Lock()
        self._drafter: DraftModelProposer | None = None  # speculative decoding with a draft model

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def start(cls, config: EngineConfig | None = None) -> Engine:
        """Load the model into worker processes and start serving; returns when ready.

        It must be awaited in an asyncio event loop (anyio's trio backend is refused at once).
        """
        _require_asyncio()
        config = config or EngineConfig()
        location = await anyio.to_thread.run_sync(locate_model, config)
        engine = cls(config, location)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        engine._supervisor = asyncio.create_task(engine._supervise(ready), name="shardline-engine")
        # Its error is logged and handed to every caller; retrieving it here keeps asyncio from
        # also reporting it as "never retrieved" when nobody awaits the engine's death.
        engine._supervisor.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            # The tokenizer loads here while the workers start (they need only the location).
            engine._info = await anyio.to_thread.run_sync(load_model_info, config, location)
            await asyncio.shield(ready)
            spec = config.speculative
            if spec is not None and spec.method == "draft_model":
                engine._drafter = await DraftModelProposer.start(
                    config, spec, engine._info.tokenizer, location.name
                )
                for core in engine._cores:
                    core.drafter = engine._drafter
        except BaseException:
            await engine.aclose()
            raise
        return engine

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        """Own every background task; report start-up failure through `ready`."""
        try:
            async with anyio.create_task_group() as tg:
                for dp_rank in range(self.config.data_parallel_size):
                    core = EngineCore(
                        functools.partial(Executor, self.config, str(self._location.path), dp_rank=dp_rank),
                        self._make_scheduler,
                        name=f"core{dp_rank}",
                        max_restarts=self.config.max_worker_restarts,
                        restart_backoff=self.config.restart_backoff,
                        freeze_gc=self.config.freeze_gc,
                    )
                    self._cores.append(core)
                    await core.start(tg)
                for core in self._cores:
                    tg.start_soon(core.run)
                logger.info(
                    "engine ready: model=%s tp=%d pp=%d dp=%d transport=%s kv_blocks=%s max_model_len=%d",
                    self._location.name,
                    self.config.tensor_parallel_size,
                    self.config.pipeline_parallel_size,
                    self.config.data_parallel_size,
                    self.config.transport,
                    [c.executor.num_kv_blocks for c in self._cores],
                    self._location.max_model_len,
                )
                if self.config.log_stats_interval > 0:  # the periodic stats line (engine.stats_logger)
                    stats_logger = StatsLogger(self.per_core_stats, self.config.log_stats_interval,
                                               gpu=self.config.device.startswith("cuda"))
                    tg.start_soon(stats_logger.run, name="shardline-stats-logger")
                ready.set_result(None)
        except BaseException as exc:
            self._death = exc
            if not ready.done():
                root = _root_cause(exc)
                ready.set_exception(root if isinstance(root, Exception) else EngineDeadError(repr(root)))
            if not isinstance(exc, asyncio.CancelledError):
                logger.error("engine died: %r", exc)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                for core in self._cores:
                    await core.aclose()

    def _make_scheduler(self, num_kv_blocks: int) -> Scheduler:
        cfg = self.config
        kv = KVCacheManager(num_kv_blocks, cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching,
                            sliding_window=self._location.kv_sliding_window)
        return Scheduler(
            SchedulerConfig(
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_model_len=self._location.max_model_len,
                block_size=cfg.block_size,
                enable_prefix_caching=cfg.enable_prefix_caching,
                workers_keep_sampled=cfg.pipeline_parallel_size == 1,
                # (speculative decoding schedules after each step's result: not async)
                async_scheduling=cfg.async_scheduling and cfg.pipeline_parallel_size == 1 and cfg.speculative is None,
                long_prefill_token_threshold=cfg.long_prefill_token_threshold,
                speculative=cfg.speculative,
            ),
            kv,
        )

    async def aclose(self) -> None:
        """Stop serving: live requests fail with EngineDeadError, workers exit. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task = self._supervisor
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            # Wait for the supervisor's own clean-up (workers reaped, channels closed); its
            # outcome (the cancellation, or the error that killed it) is not the caller's.
            await asyncio.wait([task])
        if self._drafter is not None:
            await self._drafter.aclose()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self._info.tokenizer

    @property
    def model_name(self) -> str:
        return (self.config.served_model_names or (self._info.name,))[0]

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        """The most characters a text prompt (or the contents of a chat) can have and still
        fit: max_model_len times the longest vocabulary entry. A longer text is refused from
        its length, unread (no token spans more characters than that)."""
        return self._info.max_model_len * self._info.max_token_chars

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The model's default sampling settings (generation_config.json, by SamplingParams
        field), which fill the fields a request leaves out; {} with generation_config="none"."""
        return dict(self._info.generation_defaults)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token id that ends a request (unless it sets ignore_eos)."""
        return self._info.eos_token_ids

    @property
    def is_dead(self) -> bool:
        return self._closed or self._death is not None or any(c.dead is not None for c in self._cores)

    def stats(self, *, drain_latencies: bool = False) -> EngineStats:
        """Counters summed over every replica (latency samples drained when asked)."""
        total = EngineStats()
        for core in self._cores:
            total.merge(core.stats(drain_latencies=drain_latencies))
        return total

    def per_core_stats(self) -> list[EngineStats]:
        return [core.stats() for core in self._cores]

    # ------------------------------------------------------------------ requests
    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs for one prompt (text or token ids); the last has `finished=True`.

        With `params.n` > 1 the outputs of every choice come interleaved, each with its
        `index`, and the iteration ends once each choice yielded its finished output.
        Nothing happens until the first `__anext__`: bad input raises there, as it would from
        an async generator.
        """
        size = len(prompt) if isinstance(prompt, str) else 0
        return self._outputs(functools.partial(self._tokenize, prompt), params, request_id, size)

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the assistant's reply to `messages`, formatted with the model's chat template.

        `chat_template_kwargs` (vLLM's) reach the template as variables; they may also set
        `add_generation_prompt` (default true) and `continue_final_message`. Messages may carry
        the keys the template reads besides `role` and `content` (`tool_calls`, `tool_call_id`,
        `name`). `tools` (OpenAI's tool definitions) reach the template as `tools=`, as
        transformers' `apply_chat_template` passes them."""
        size = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)) \
            if isinstance(messages, list) else 0
        prepare = functools.partial(self._chat_token_ids, messages, chat_template_kwargs, tools)
        return self._outputs(prepare, params, request_id, size)

    def _outputs(
        self, prepare: Callable[[], list[int]], params: SamplingParams | None, request_id: str | None, size: int
    ) -> AsyncIterator[RequestOutput]:
        if params is not None and params.n > 1:
            return ParallelRequestOutputs(self, prepare, params, request_id, size)
        return RequestOutputs(self, prepare, params, request_id, size)

    def _chat_token_ids(
        self, messages: list[dict[str, Any]], chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list of {role, content}")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise InvalidRequestError("messages", f"each message needs string 'role' and 'content', got {message!r}")
        self._check_prompt_chars(sum(len(m["content"]) for m in messages))
        try:
            return self._info.apply_chat_template(messages, chat_template_kwargs, tools=tools)
        except InvalidRequestError:  # chat_template_kwargs refused, by name
            raise
        except Exception as exc:  # jinja errors on odd roles, etc.
            raise InvalidRequestError("messages", f"chat template failed: {exc}") from exc

    async def abort(self, request_id: str) -> None:
        """Abort a request by id (every choice of one with n > 1); its stream ends with
        finish_reason 'abort'."""
        parallel = self._parallel.get(request_id)
        if parallel is not None:
            parallel.abort()
        for core in self._cores:
            core.abort(request_id)

    def _check_prompt_chars(self, chars: int) -> None:
        """Refuse a text that cannot fit from its length alone, before tokenizing it: no token
        of the model spans more than `max_token_chars` characters."""
        limit = self._info.max_model_len * self._info.max_token_chars
        if chars > limit:
            raise PromptTooLongError(
                f"the prompt has {chars} characters; at most {self._info.max_model_len} tokens fit "
                f"(max_model_len) and no token of this model spans more than "
                f"{self._info.max_token_chars} characters")

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt))
            return self._info.encode_prompt(prompt)
        items: list[object] = list(prompt) if isinstance(prompt, Sequence) else [prompt]
        token_ids = [t for t in items if isinstance(t, int) and not isinstance(t, bool)]
        if len(token_ids) == len(items):
            return token_ids  # an empty list is reported by validate_request
        raise InvalidRequestError("prompt", "must be a string or a list of token ids")

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The engine's structured-output compiler (built on first use, on the calling thread:
        call it off the event loop, as `compile_grammar` does)."""
        with self._grammar_compiler_lock:
            if self._grammar_compiler is None:
                info = self._info
                try:
                    self._grammar_compiler = GrammarCompiler(
                        info.tokenizer, eos_token_ids=info.eos_token_ids, vocab_size=info.vocab_size
                    )
                except ValueError as exc:  # not a fast tokenizer, no EOS id, ...
                    raise InvalidRequestError(
                        "structured_output", f"structured output is not available for this model: {exc}"
                    ) from exc
            return self._grammar_compiler

    async def compile_grammar(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """Compile `spec` off the event loop (a cached grammar is taken at once): raises
        InvalidRequestError naming `spec.field` for a grammar or schema feature that cannot be
        enforced. `generate`/`chat` call it for `SamplingParams.structured_output` before
        anything is scheduled; a server may call it earlier to answer a bad schema."""
        compiler = self._grammar_compiler
        if compiler is None:
            compiler = await anyio.to_thread.run_sync(lambda: self.grammar_compiler)
        cached = compiler.cached(spec)
        if cached is not None:
            return cached
        return await anyio.to_thread.run_sync(compiler.compile, spec)

    def _submit(
        self, token_ids: list[int], params: SamplingParams, request_id: str | None, grammar: CompiledGrammar | None
    ) -> tuple[EngineCore, str, OutputStream]:
        """Validate and queue one request on the least busy replica; returns where it went."""
        core, params = self._admit(token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        return core, request_id, self._enqueue(core, token_ids, params, request_id, grammar)

    def _admit(self, token_ids: list[int], params: SamplingParams) -> tuple[EngineCore, SamplingParams]:
        """Validate a request (all its `params.n` choices) and choose the least busy replica
        for it; returns the replica and the parameters with the model's defaults filled in."""
        if self.is_dead:
            raise EngineDeadError("engine is not running")
        max_model_len = self._info.max_model_len
        params = params.with_model_defaults(
            self._info.generation_defaults, max_tokens_cap=max_model_len - len(token_ids)
        )
        validate_request(token_ids, params, max_model_len=max_model_len, vocab_size=self._info.vocab_size)
        check_logprobs_cap(params, max_logprobs=self.config.max_logprobs, vocab_size=self._info.vocab_size)
        _check_wire_ints(params)
        core = min(self._cores, key=lambda c: c.num_unfinished)
        if core.num_unfinished + params.n > self.config.max_waiting_requests:
            choices = f"; this request's n={params.n} choices do not fit" if params.n > 1 else ""
            raise EngineOverloadedError(
                f"{core.num_unfinished} requests already queued (max_waiting_requests="
                f"{self.config.max_waiting_requests}){choices}"
            )
        return core, params

    def _enqueue(
        self, core: EngineCore, token_ids: list[int], params: SamplingParams, request_id: str,
        grammar: CompiledGrammar | None,
    ) -> OutputStream:
        """Queue one admitted request (one choice) on `core`; returns its output stream. A
        constrained request (`grammar`: its compiled structured_output) gets a matcher of its own."""
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self._info.eos_token_ids,
        )
        if params.structured_output is not None:
            if grammar is None or grammar.spec != params.structured_output or self._grammar_compiler is None:
                raise RuntimeError("a structured_output request was submitted without its compiled grammar")
            request.grammar = GrammarMatcher(grammar, self._grammar_compiler)
        detokenizer = IncrementalDetokenizer(
            self._info.tokenizer,
            token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )
        return core.submit(request, detokenizer)


TOKENIZE_OFF_LOOP_CHARS = 16_384  # text prompts longer than this are tokenized on a thread


class _LazyOutputs:
    """What both kinds of outputs share: the prompt is prepared (tokenized, validated) and the
    request submitted on the first `__anext__`, in one try, like an async generator's body."""

    __slots__ = ("_engine", "_prepare", "_params", "_request_id", "_loop", "_size", "_grammar")

    def __init__(
        self,
        engine: Engine,
        prepare: Callable[[], list[int]],
        params: SamplingParams | None,
        request_id: str | None,
        size: int = 0,
    ) -> None:
        self._size = size  # characters of text to tokenize: large ones are tokenized off the loop
        self._engine: Engine | None = engine
        self._prepare: Callable[[], list[int]] | None = prepare
        self._params = params
        self._request_id = request_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grammar: CompiledGrammar | None = None
        self._init_state()

    def _init_state(self) -> None:
        """Set the subclass's own attributes (called by `__init__`)."""

    async def _prepare_in_thread(self) -> None:
        """Tokenize a large prompt on a worker thread (the event loop keeps serving); `_start`
        then submits the ids."""
        prepare = self._prepare
        if prepare is None:
            return
        try:
            token_ids = await anyio.to_thread.run_sync(prepare)
        except BaseException:
            self._engine = self._prepare = None  # one try, like a generator that raised
            raise
        self._prepare = lambda: token_ids

    async def _compile_grammar(self) -> None:
        """Compile the request's structured_output off the loop, before anything is submitted
        (a grammar that cannot be enforced raises here, naming its field)."""
        engine, params = self._engine, self._params
        if engine is None or params is None or params.structured_output is None:
            return
        try:
            self._grammar = await engine.compile_grammar(params.structured_output)
        except BaseException:
            self._engine = self._prepare = None  # one try, like a generator that raised
            raise

    def _claim(self) -> tuple[Engine, list[int], SamplingParams]:
        """The engine, prompt ids and parameters to submit, once; StopAsyncIteration after a
        start that failed or a close."""
        engine, prepare = self._engine, self._prepare
        if engine is None or prepare is None:  # started before, and that failed or was closed
            raise StopAsyncIteration
        self._engine = self._prepare = None  # one try, like a generator that raised
        self._loop = asyncio.get_running_loop()
        return engine, prepare(), self._params or SamplingParams()


class RequestOutputs(_LazyOutputs):
    """One request's outputs, as `Engine.generate` and `Engine.chat` return them.

    It behaves as the async generator it replaces (`async for item in stream: yield item`
    inside try/finally), one object and one coroutine per output instead of two generator
    layers, a stream coroutine and a `receive` coroutine: this runs once per token of every
    streaming request.

    * The request is validated and submitted on the first `__anext__`; bad input raises there.
    * An error from the engine is raised to the caller; the iteration then ends.
    * Anything raised while waiting (the caller's task cancelled) aborts the request, frees
      its KV blocks, and ends the iteration; so do `aclose()` and dropping the iterator early.
    * A stream that ends without a finished output raises EngineDeadError.
    """

    __slots__ = ("_core", "_rid", "_stream", "_finished", "_done")

    def _init_state(self) -> None:
        self._core: EngineCore | None = None
        self._rid = ""
        self._stream: OutputStream | None = None
        self._finished = False
        self._done = False

    def __aiter__(self) -> RequestOutputs:
        return self

    async def __anext__(self) -> RequestOutput:
        stream = self._stream
        if stream is None:
            await self._compile_grammar()
            if self._size > TOKENIZE_OFF_LOOP_CHARS:
                await self._prepare_in_thread()
            stream = self._start()
        elif self._done:
            raise StopAsyncIteration
        try:
            item = await stream.next_future()
        except BaseException:
            self._close()  # cancelled while waiting: the request is aborted
            raise
        if type(item) is RequestOutput:
            self._finished = item.finished
            return item
        self._close()
        if item is END_OF_STREAM:
            if not self._finished:
                raise EngineDeadError("engine stopped before the request finished")
            raise StopAsyncIteration
        raise item

    def _start(self) -> OutputStream:
        engine, token_ids, params = self._claim()
        self._core, self._rid, self._stream = engine._submit(token_ids, params, self._request_id, self._grammar)
        return self._stream

    def _close(self) -> None:
        """The generator's `finally`: close our end; abort the request unless it finished."""
        if self._done:
            return
        self._done = True
        if self._stream is not None and self._core is not None:
            _release(self._stream, self._core, self._rid, abort=not self._finished)

    async def aclose(self) -> None:
        """Stop reading: abort the request unless it finished (idempotent)."""
        self._engine = self._prepare = None
        self._close()

    def __del__(self) -> None:
        # Dropped mid-stream without aclose (e.g. the caller broke out of its loop): what the
        # event loop's async-generator finalizer did for the generator, from the loop's thread.
        if self._done or self._stream is None or self._core is None or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_release, self._stream, self._core, self._rid, not self._finished)
        except RuntimeError:  # the loop is closed: nothing left to abort
            pass


class ParallelRequestOutputs(_LazyOutputs):
    """The outputs of a request with `n` > 1 choices, interleaved, as one iterator.

    Each choice is a request of its own in the engine (id f"{request_id}-{i}", n=1, seed
    `seed + i` when the request has a seed); its outputs come with `index` i and the
    caller's `request_id`. Choice 0 is submitted first; the others once its first output
    arrived: its prompt's K/V are computed by then and its full blocks are in the prefix
    cache, so every other choice reuses them and computes only the prompt's last, partial
    block (as SGLang does; vLLM submits all at once and shares nothing until a block is
    computed). The iteration ends once every choice yielded its finished output. Leaving
    early, an error, cancellation and `Engine.abort(request_id)` abort every choice; a choice
    not started when the request is aborted still ends, with finish_reason "abort".
    """

    __slots__ = ("_owner", "_core", "_parent_id", "_token_ids", "_choices", "_streams", "_waits", "_ready",
                 "_finished", "_started_all", "_aborted", "_done", "__weakref__")

    def _init_state(self) -> None:
        self._owner: Engine | None = None  # the engine, from the start until the end
        self._core: EngineCore | None = None
        self._parent_id = ""
        self._token_ids: list[int] = []
        self._choices: list[SamplingParams] = []  # each choice's parameters (n=1)
        self._streams: dict[int, OutputStream] = {}  # started choices that did not finish
        self._waits: dict[int, asyncio.Future[Any]] = {}  # each one's next item
        self._ready: deque[RequestOutput | BaseException] = deque()
        self._finished: set[int] = set()
        self._started_all = False
        self._aborted = False
        self._done = False

    def __aiter__(self) -> ParallelRequestOutputs:
        return self

    def _child_id(self, index: int) -> str:
        return f"{self._parent_id}-{index}"

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._core is None:
            await self._compile_grammar()
            if self._size > TOKENIZE_OFF_LOOP_CHARS:
                await self._prepare_in_thread()
            self._start()
        while not self._ready:
            if not self._waits:
                self._close()
                raise StopAsyncIteration
            if not any(future.done() for future in self._waits.values()):
                try:
                    await asyncio.wait(self._waits.values(), return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    self._close()  # cancelled while waiting: every choice is aborted
                    raise
            for index, future in list(self._waits.items()):
                if future.done():
                    self._take(index, future.result())
        item = self._ready.popleft()
        if isinstance(item, BaseException):
            self._close()
            raise item
        return item

    def _start(self) -> None:
        engine, token_ids, params = self._claim()
        core, params = engine._admit(token_ids, params)
        parent_id = self._request_id or uuid.uuid4().hex
        if parent_id in engine._parallel:
            raise InvalidRequestError("request_id", f"request id {parent_id!r} is already in use")
        self._core, self._parent_id, self._token_ids = core, parent_id, token_ids
        self._choices = [
            dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + index)
            for index in range(params.n)
        ]
        engine._parallel[parent_id] = self
        self._owner = engine
        self._submit_choice(engine, 0)

    def _submit_choice(self, engine: Engine, index: int) -> None:
        assert self._core is not None
        stream = engine._enqueue(self._core, self._token_ids, self._choices[index], self._child_id(index), self._grammar)
        self._streams[index] = stream
        self._waits[index] = stream.next_future()

    def _take(self, index: int, item: Any) -> None:
        """Handle choice `index`'s next item: queue it for the caller, wait for the next one."""
        del self._waits[index]
        stream = self._streams[index]
        if type(item) is RequestOutput:
            item.request_id, item.index = self._parent_id, index
            self._ready.append(item)
            if item.finished:
                self._finished.add(index)
                del self._streams[index]
                stream.close_receiver()
            else:
                self._waits[index] = stream.next_future()
            if not self._started_all:
                self._start_others(aborted=self._aborted or item.finish_reason == FinishReason.ABORT.value)
            return
        del self._streams[index]
        if item is END_OF_STREAM:
            item = EngineDeadError("engine stopped before the request finished")
        self._ready.append(item)

    def _start_others(self, *, aborted: bool) -> None:
        """Choice 0's prompt is computed: start every other choice (or end each with "abort")."""
        self._started_all = True
        owner = self._owner
        for index in range(1, len(self._choices)):
            if aborted or owner is None:
                self._finished.add(index)
                self._ready.append(
                    RequestOutput(self._parent_id, "", "", [], [], None, True, FinishReason.ABORT.value,
                                  len(self._token_ids), 0, index=index)
                )
                continue
            try:
                self._submit_choice(owner, index)
            except EngineDeadError as exc:
                self._ready.append(exc)
                return

    def abort(self) -> None:
        """`Engine.abort` of this request: every choice started is aborted, the rest end so."""
        self._aborted = True
        core = self._core
        if core is not None:
            for index in self._streams:
                core.abort(self._child_id(index))

    def _close(self) -> None:
        """The generator's `finally`: close our ends; abort every choice that did not finish."""
        if self._done:
            return
        self._done = True
        self._ready.clear()
        for future in self._waits.values():
            future.cancel()  # so that closing its stream does not set an error nobody reads
        self._waits.clear()
        owner, self._owner = self._owner, None
        if owner is not None and owner._parallel.get(self._parent_id) is self:
            del owner._parallel[self._parent_id]
        if self._core is not None:
            _release_choices(self._core, self._unfinished())
        self._streams.clear()

    def _unfinished(self) -> list[tuple[OutputStream, str]]:
        return [(stream, self._child_id(index)) for index, stream in self._streams.items()]

    async def aclose(self) -> None:
        """Stop reading: abort every choice that did not finish (idempotent)."""
        self._engine = self._prepare = None
        self._close()

    def __del__(self) -> None:
        # Dropped mid-stream without aclose: as RequestOutputs.__del__, for every choice.
        if self._done or self._core is None or self._loop is None or not self._streams:
            return
        try:
            self._loop.call_soon_threadsafe(_release_choices, self._core, self._unfinished())
        except RuntimeError:  # the loop is closed: nothing left to abort
            pass


def _release_choices(core: EngineCore, choices: list[tuple[OutputStream, str]]) -> None:
    for stream, request_id in choices:
        _release(stream, core, request_id, abort=True)


def _release(stream: OutputStream, core: EngineCore, request_id: str, abort: bool) -> None:
    stream.close_receiver()
    if abort:
        core.abort(request_id)


_INT64 = range(-(2**63), 2**63)


def _check_wire_ints(params: SamplingParams) -> None:
    """Integers that travel to the workers must fit msgpack's 64 bits.

    A larger `seed` or `top_k` would make the whole step unencodable, and that stops the
    engine for everyone; refusing the one request is the specific error it deserves.
    """
    for name in ("seed", "top_k", "logprobs"):
        value = getattr(params, name, None)
        if isinstance(value, int) and value not in _INT64:
            raise InvalidRequestError(name, f"must fit in a signed 64-bit integer, got {value}")
    if params.seed is not None and params.seed + params.n - 1 not in _INT64:
        raise InvalidRequestError(
            "seed", f"choice i of n samples with seed + i: seed + n - 1 must fit in a signed 64-bit integer, "
            f"got seed={params.seed}, n={params.n}")


def _require_asyncio() -> None:
    """Refuse, before anything starts, an event loop that is not asyncio's (trio, under anyio).

    The engine's tasks, futures and stream hand-offs are asyncio's; under trio they would fail
    later and obscurely, after the model had loaded.
    """
    try:
        asyncio.get_running_loop()
        return
    except RuntimeError:
        pass
    try:
        import sniffio

        library = sniffio.current_async_library()
    except Exception:  # sniffio missing, or no async library it knows
        library = "an event loop that is not asyncio's"
    raise RuntimeError(
        f"shardline's Engine runs on asyncio, but Engine.start was awaited under {library}. "
        "Run it in an asyncio event loop: asyncio.run(main()), or anyio.run(main) with anyio's "
        "default backend='asyncio'."
    )


def _root_cause(exc: BaseException) -> BaseException:
    """The error a caller should see: the first real failure inside task-group wrappers."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        if not inner:
            break
        exc = inner[0]
    return exc
