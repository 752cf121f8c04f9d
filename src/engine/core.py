"""EngineCore: the actor that owns all scheduling state of one replica.

Its loop is short and numbered:

    1) drain the inbox (new requests, aborts)    -- work and aborts share one inbox
    2) schedule -> execute on the workers -> update from the result
    3) detokenize, check stop strings, publish outputs to each request's stream

Callers never touch the scheduler: `submit` and `abort` only put commands in the inbox, so the
loop is the single writer of every piece of request state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import heapq
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from shardline.engine.detokenizer import IncrementalDetokenizer, update_batch
from shardline.engine.errors import EngineDeadError, InvalidRequestError
from shardline.engine.executor import Executor, WorkerFailure
from shardline.engine.output_stream import OutputStream
from shardline.engine.request import FinishReason, Request, RequestOutput, TokenLogprob
from shardline.engine.request_metrics import HistogramCounts, RequestMetrics
from shardline.engine.scheduler import RequestUpdate, Scheduler, SchedulerOutput
from shardline.engine.step_timer import StepTimer
from shardline.engine.structured_output import GrammarStateError, allocate_bitmask
from shardline.transport.messages import (
    CachedRequest,
    ExecuteStep,
    NewRequest,
    PromptLogprobs,
    SampleLogprobs,
    StepResult,
    TensorPayload,
)

if TYPE_CHECKING:
    from shardline.engine.draft_model import DraftModelProposer

logger = logging.getLogger("shardline.core")

LATENCY_SAMPLES = 4096
"""Time-to-first-token and inter-token samples kept per replica (the most recent ones)."""

_InFlight = deque[tuple[SchedulerOutput, asyncio.Future[StepResult], anyio.CancelScope]]
"""Steps sent and not yet applied, oldest first: the step, its result to come, its task's scope."""


@dataclass
class _Submit:
    request: Request
    detokenizer: IncrementalDetokenizer
    stream: OutputStream


@dataclass
class _Abort:
    request_id: str
    reason: FinishReason = FinishReason.ABORT


@dataclass
class _Live:
    """Output-side state of one request (the scheduler holds the rest)."""

    request: Request
    detokenizer: IncrementalDetokenizer
    stream: OutputStream
    want_logprobs: bool
    # SamplingParams.prompt_logprobs: the entries gathered so far ([None] for the first prompt
    # token, then one per position the workers scored); None once sent (or not asked for).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    scheduled_at: float | None = None  # its first step was built (request_metrics)


@dataclass
class EngineStats:
    """A snapshot of one replica (or the sum over replicas)."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_total: int = 0
    num_kv_blocks_used: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens_computed: int = 0
    num_steps: int = 0
    num_restarts: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)
    # The most recent LATENCY_SAMPLES samples per replica since the last drain.
    ttft_seconds: list[float] = field(default_factory=list)
    itl_seconds: list[float] = field(default_factory=list)
    # Cumulative, by metric name (engine.request_metrics); prefix-cache lookups in tokens.
    histograms: dict[str, HistogramCounts] = field(default_factory=dict)
    prefix_cache_queries: int = 0
    # Speculative decoding (vLLM's spec_decode counters; scheduler.SchedulerStats): verified
    # drafts, draft tokens, accepted draft tokens, accepted drafts by position ({position: n}).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: dict[int, int] = field(default_factory=dict)

    def merge(self, other: EngineStats) -> None:
        """Add another replica's snapshot: counters sum, per-reason counts add, samples extend."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, f.name, mine + theirs)

    @property
    def kv_cache_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks_total if self.num_kv_blocks_total else 0.0


class EngineCore:
    """One replica's actor loop: scheduler + KV manager + executor."""

    one_step_while_constrained = True
    """Structured output with async scheduling. A constrained request's mask needs its previous
    token, so it never runs in a step sent while that token is in flight (the scheduler sees to
    it). True (the default): the core keeps one step in flight while any constrained request is
    live, so every request runs in every step and waits for the engine between steps (async
    scheduling measured neutral on CPU: RESULTS.md section 10). False: two steps stay in flight;
    the free requests run in every step, a constrained one in every other (half its speed).
    benchmarks/structured_output_throughput.py measures both (RESULTS.md section 15)."""

    def __init__(
        self,
        executor_factory: Callable[[], Executor],
        scheduler_factory: Callable[[int], Scheduler],
        *,
        name: str = "core0",
        max_restarts: int = 0,
        restart_backoff: float = 0.5,
        freeze_gc: bool = True,
    ) -> None:
        self.name = name
        self._executor_factory = executor_factory
        self._scheduler_factory = scheduler_factory
        self.max_restarts = max_restarts
        self.restart_backoff = restart_backoff
        self._freeze_gc = freeze_gc
        self.num_restarts = 0
        self.executor: Executor = executor_factory()
        self.scheduler: Scheduler = scheduler_factory(1)  # replaced in start() once blocks are known
        self.request_metrics = RequestMetrics(self.scheduler.config.max_model_len)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[_Submit | _Abort](math.inf)
        self._live: dict[str, _Live] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._step_id = 0
        self._finished: Counter[str] = Counter()
        self._generation_tokens = 0
        self._prompt_tokens = 0
        # The most recent latency samples (`stats(drain_latencies=True)` empties them); bounded,
        # since nothing has to drain them: one per generated token would otherwise grow forever.
        self._ttft: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._itl: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.dead: BaseException | None = None
        self._timer = StepTimer.from_env(name)
        # Speculative decoding with a draft model (engine/draft_model.py): set by the Engine.
        self.drafter: DraftModelProposer | None = None

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start the worker group; the executor's background tasks live in `task_group`."""
        self._task_group = task_group
        await self.executor.start(task_group)
        self.scheduler = self._scheduler_factory(self.executor.num_kv_blocks)
        # What is loaded by now (torch, the tokenizer, the model info) lives as long as the
        # process: move it out of the collector's sight, as vLLM does, so that the full
        # collections serving triggers scan what serving allocates, not ~10^5 library objects
        # (measured: ~100 ms per full collection, several per second under load).
        if self._freeze_gc:
            gc.freeze()

    # ------------------------------------------------------------ caller side
    def submit(self, request: Request, detokenizer: IncrementalDetokenizer) -> OutputStream:
        """Queue a validated request; returns the stream its outputs arrive on."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead}")
        stream = OutputStream()
        self._inbox_send.send_nowait(_Submit(request, detokenizer, stream))
        return stream

    def abort(self, request_id: str) -> None:
        """Ask the loop to abort a request (no-op if it already finished)."""
        if self.dead is None:
            self._inbox_send.send_nowait(_Abort(request_id))

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (routing load for data parallelism)."""
        return len(self._live) + self._inbox.statistics().current_buffer_used

    def stats(self, *, drain_latencies: bool = False) -> EngineStats:
        """A snapshot of this replica's counters."""
        sched = self.scheduler
        kv = sched.kv_cache
        stats = EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_kv_blocks_total=kv.num_blocks,
            num_kv_blocks_used=kv.num_used_blocks,
            num_preemptions=sched.stats.num_preemptions,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            prefix_cache_hit_tokens=sched.stats.prefix_cache_hit_tokens,
            prompt_tokens_computed=sched.stats.prompt_tokens_computed,
            num_steps=self._step_id,
            num_restarts=self.num_restarts,
            requests_finished=dict(self._finished),
            ttft_seconds=list(self._ttft),
            itl_seconds=list(self._itl),
            histograms=self.request_metrics.snapshot(),
            prefix_cache_queries=sched.stats.prefix_cache_queries,
            spec_num_drafts=sched.stats.spec_num_drafts,
            spec_num_draft_tokens=sched.stats.spec_num_draft_tokens,
            spec_num_accepted_tokens=sched.stats.spec_num_accepted_tokens,
            spec_accepted_per_pos=dict(enumerate(sched.stats.spec_accepted_per_pos)),
        )
        if drain_latencies:
            self._ttft.clear()
            self._itl.clear()
        return stats

    # ------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Serve until cancelled or the workers fail for good; then every live request gets the error.

        Each pass: take commands, schedule and send a step, publish the last processed step's
        outputs while the workers run (when that provably changes nothing, `_can_defer_publish`),
        then wait for the oldest step in flight and apply its result. With async scheduling
        (`SchedulerConfig.async_scheduling`) up to two steps are in flight: step N+1 is scheduled
        and sent before step N's result is applied, so the workers go from one step to the next
        without waiting for the engine.
        """
        timer = self._timer
        pending: list[RequestUpdate] | None = None  # an applied step's updates, not yet published
        in_flight: _InFlight = deque()
        task_group = self._task_group
        if task_group is None:
            raise RuntimeError("EngineCore.run before start")
        loop = asyncio.get_running_loop()
        try:
            while True:
                max_in_flight = 2 if self.scheduler.config.async_scheduling else 1
                if self.one_step_while_constrained and self.scheduler.num_constrained:
                    max_in_flight = 1
                # 1) drain inputs; sleep on the inbox only when there is nothing to run.
                if pending is not None and self.executor.failure is not None:
                    pending = self._publish_now(pending)
                idle = pending is None and not in_flight and not self.scheduler.has_unfinished_requests()
                if self.executor.failure is not None and in_flight:
                    self._drop_in_flight(in_flight)
                await self._wait_for_work(idle=idle)
                timer.lap("idle (no requests)" if idle else "wait for work")
                commands = self._take_inbox()
                now = time.monotonic()  # one clock reading for the deferral check and the deadlines
                if pending is not None and (commands or not self._can_defer_publish(pending, now)):
                    pending = self._publish_now(pending)  # the plain order: publish, then commands
                for command in commands:
                    self._handle(command)
                self._expire_deadlines(now)
                timer.lap("inbox, deadlines")
                # 2) schedule and send the next step, unless the pipeline of steps is full.
                sent = False
                if len(in_flight) < max_in_flight and self.scheduler.has_unfinished_requests():
                    if self.drafter is not None:
                        pending = await self._propose_drafts(pending)
                        timer.lap("draft model")
                    output = self.scheduler.schedule()
                    timer.lap("schedule")
                    if output.total_num_scheduled_tokens:
                        message = self._to_message(output)
                        timer.lap("build ExecuteStep")
                        if timer.enabled:
                            timer.measure_encode(message)
                        # The step runs as a task of the engine's task group (it must go out
                        # while this loop goes on); its result comes back through `reply`.
                        reply: asyncio.Future[StepResult] = loop.create_future()
                        scope = anyio.CancelScope()
                        task_group.start_soon(self._execute, self.executor, message, reply, scope)
                        in_flight.append((output, reply, scope))
                        sent = True
                # 3) publish the last step's outputs while the workers run.
                if pending is not None:
                    to_publish, pending = pending, None
                    if sent:
                        await self._publish_overlapped(to_publish)
                    else:
                        self._publish_now(to_publish)
                if not in_flight:
                    if self.scheduler.has_unfinished_requests():
                        # Nothing fits right now (every block pinned): wait for an abort or an arrival.
                        await self._wait_for_work(idle=True, at_most=0.05)
                    continue
                if sent and len(in_flight) < max_in_flight:
                    continue  # schedule the next step before waiting for this one
                # 4) wait for the oldest step in flight and apply its result (it stays in
                # `in_flight` until then, so that a cancellation here stops its task too).
                output, future, _ = in_flight[0]
                try:
                    result = await future
                except WorkerFailure as failure:
                    self._drop_in_flight(in_flight)
                    await self._recover(failure)
                    continue
                in_flight.popleft()
                timer.lap_execute()
                if result.prompt_logprobs:
                    self._add_prompt_logprobs(result.prompt_logprobs)
                logprobs = None
                if result.logprobs is not None:
                    logprobs = dict(zip(result.req_ids, result.logprobs, strict=True))
                if output.spec_token_ids:
                    pending = self._apply_speculative(output, result, logprobs)
                else:
                    pending = self.scheduler.update_from_output(
                        output, dict(zip(result.req_ids, result.sampled_token_ids, strict=True)), logprobs
                    )
                timer.lap("update_from_output")
                timer.step_done()
        except BaseException as exc:
            self._drop_in_flight(in_flight)
            self.dead = exc
            self._fail_all(exc)
            raise
        finally:
            timer.dump()
            await self.aclose()

    async def _propose_drafts(self, pending: list[RequestUpdate] | None) -> list[RequestUpdate] | None:
        """Ask the draft model for the drafts of this step's decodes (engine/draft_model.py);
        the last step's outputs are published first (the callers should not wait for it)."""
        drafter = self.drafter
        candidates = self.scheduler.draft_candidates()
        if drafter is None or not candidates:
            return pending
        if pending is not None:
            pending = self._publish_now(pending)
        drafts = await drafter.propose(candidates)
        self.scheduler.draft_proposals = {
            req_id: (len(context), drafts[req_id]) for req_id, context, _ in candidates if req_id in drafts
        }
        return pending

    def _apply_speculative(
        self, output: SchedulerOutput, result: StepResult, logprobs: dict[str, Any] | None
    ) -> list[RequestUpdate]:
        """update_from_output for a step that verified draft tokens (speculative decoding)."""
        accepted = dict(zip(result.req_ids, result.spec_num_accepted, strict=True))
        spec_logprobs = dict(zip(result.req_ids, result.spec_logprobs, strict=True)) if result.spec_logprobs else None
        return self.scheduler.update_from_output(
            output, dict(zip(result.req_ids, result.sampled_token_ids, strict=True)), logprobs,
            spec_accepted=accepted, spec_logprobs=spec_logprobs,
        )

    @staticmethod
    async def _execute(
        executor: Executor, message: ExecuteStep, reply: asyncio.Future[StepResult], scope: anyio.CancelScope
    ) -> None:
        """Run one step on the workers; its result, or the error it failed with, goes to `reply`.

        A task of the engine's task group that never fails it: a worker failure is the loop's
        to handle (`reply` raises it there), not a reason to cancel the engine's other tasks.
        """
        with scope:
            try:
                result = await executor.execute(message)
            except Exception as exc:
                if not reply.done():  # (done: dropped, the loop no longer waits for it)
                    reply.set_exception(exc)
                return
            if not reply.done():
                reply.set_result(result)

    @staticmethod
    def _drop_in_flight(in_flight: _InFlight) -> None:
        """Forget steps whose results will not be applied (a failure, shutdown): stop their tasks."""
        for _, reply, scope in in_flight:
            if not reply.cancel() and not reply.cancelled():
                reply.exception()  # already failed: retrieved, so asyncio does not report it
            scope.cancel()
        in_flight.clear()

    def _publish_now(self, updates: list[RequestUpdate]) -> list[RequestUpdate] | None:
        """3) publish (detokenize, stop strings, streams); returns what is left pending: none."""
        self._publish_all(updates)
        self._timer.lap("detokenize + publish")
        return None

    def _can_defer_publish(self, updates: list[RequestUpdate], now: float) -> bool:
        """Whether publishing `updates` after scheduling the next step changes nothing.

        Publishing touches the scheduler only through a stop string (it finishes the request)
        and through a caller that went away (`_send` queues an abort); the inbox is empty here
        (checked by the caller) and no deadline is due, so scheduling sees the same state
        either way, and each stream gets the same items in the same order.
        """
        if self._deadlines and self._deadlines[0][0] <= now:
            return False
        for update in updates:
            live = self._live.get(update.request.request_id)
            if live is not None and (live.detokenizer.has_stop_strings or live.stream.receiver_closed):
                return False
        return True

    async def _publish_overlapped(self, updates: list[RequestUpdate]) -> None:
        """Publish the previous step's `updates` once the step just sent has gone out."""
        try:
            await asyncio.sleep(0)  # the step goes out (shm writes inline) before the CPU work
        except BaseException:
            self._publish_all(updates)  # cancelled while sending: the outputs still reach their streams
            raise
        self._publish_all(updates)
        self._timer.lap("detokenize + publish (overlapped)")

    async def aclose(self) -> None:
        """Shut the worker group down and close the inbox. Idempotent."""
        with anyio.CancelScope(shield=True):
            await self.executor.shutdown()
        self._inbox_send.close()
        self._inbox.close()

    async def _wait_for_work(self, *, idle: bool, at_most: float | None = None) -> None:
        """When idle, sleep until a command arrives, a deadline passes or the workers fail."""
        if self.executor.failure is not None:
            await self._recover(self.executor.failure)
            return
        if not idle:
            return
        timeout = at_most
        if self._deadlines:
            until_deadline = max(0.0, self._deadlines[0][0] - time.monotonic())
            timeout = until_deadline if timeout is None else min(timeout, until_deadline)
        with anyio.move_on_after(timeout if timeout is not None else math.inf):
            async with anyio.create_task_group() as tg:

                async def on_command() -> None:
                    self._handle(await self._inbox.receive())
                    tg.cancel_scope.cancel()

                async def on_failure() -> None:
                    await self.executor.wait_failed()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_command)
                tg.start_soon(on_failure)
        if self.executor.failure is not None:
            await self._recover(self.executor.failure)

    async def _recover(self, failure: WorkerFailure) -> None:
        """Restart the worker group and recompute every live request, or give up."""
        if self.num_restarts >= self.max_restarts:
            raise failure
        self.num_restarts += 1
        logger.warning(
            "%s: %s; restarting the worker group (%d of %d)", self.name, failure, self.num_restarts, self.max_restarts
        )
        assert self._task_group is not None
        await self.executor.shutdown()
        # The first restart is immediate (a lone crash costs callers only the new workers'
        # start-up); repeated failures back off: restart_backoff, doubling.
        if self.num_restarts > 1:
            await anyio.sleep(self.restart_backoff * 2 ** (self.num_restarts - 2))
        self.executor = self._executor_factory()
        await self.executor.start(self._task_group)
        # The new workers hold no KV and no request state: every live request recomputes
        # from its prompt plus the tokens already streamed, so callers see no gap.
        fresh = self._scheduler_factory(self.executor.num_kv_blocks)
        self.scheduler.transfer_for_recompute(fresh)
        self.scheduler = fresh

    def _expire_deadlines(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            live = self._live.get(request_id)
            if live is not None:
                self.scheduler.finish_requests([request_id], FinishReason.ABORT)
                self._finish(live, FinishReason.ABORT.value, delta=live.detokenizer.flush(), new_token_ids=[], logprobs=None)

    def _take_inbox(self) -> list[_Submit | _Abort]:
        commands: list[_Submit | _Abort] = []
        while True:
            try:
                commands.append(self._inbox.receive_nowait())
            except anyio.WouldBlock:
                return commands

    def _handle(self, command: _Submit | _Abort) -> None:
        if isinstance(command, _Submit):
            request = command.request
            try:
                # Refuses (among others) a request the whole KV pool could not hold.
                self.scheduler.add_request(request)
            except (InvalidRequestError, ValueError) as exc:
                command.stream.send_nowait(exc)
                command.stream.close()
                return
            self._live[request.request_id] = _Live(
                request,
                command.detokenizer,
                command.stream,
                request.sampling_params.logprobs is not None,
                [None] if request.sampling_params.prompt_logprobs is not None else None,
            )
            self._prompt_tokens += request.num_prompt_tokens
            timeout = request.sampling_params.timeout
            if timeout is not None:
                heapq.heappush(self._deadlines, (time.monotonic() + timeout, request.request_id))
            return
        live = self._live.get(command.request_id)
        if live is None:
            return
        self.scheduler.finish_requests([command.request_id], command.reason)
        self._finish(live, command.reason.value, delta="", new_token_ids=[], logprobs=None)

    def _to_message(self, output: SchedulerOutput) -> ExecuteStep:
        self._step_id += 1
        self._note_scheduled(output)
        bitmask = self._fill_bitmasks(output.structured_ids) if output.structured_ids else None
        return ExecuteStep(
            step_id=output.step_id,
            # The scheduler's lists are fresh per step and encoded before the next one, so
            # they travel as they are (no copies); positional arguments, in field order, for
            # a step that carries hundreds of requests.
            new_requests=[
                NewRequest(
                    r.req_id,
                    r.prompt_token_ids,
                    r.sampling_params.to_options(eos_token_ids=r.eos_token_ids, num_output_tokens=r.num_output_tokens),
                    r.block_ids,
                    r.num_computed_tokens,
                    r.num_scheduled_tokens,
                )
                for r in output.scheduled_new
            ],
            cached_requests=[
                CachedRequest(
                    r.req_id,
                    r.new_token_ids,
                    r.new_block_ids,
                    r.num_computed_tokens,
                    r.num_scheduled_tokens,
                    r.resumed,
                )
                for r in output.scheduled_cached
            ],
            finished_ids=output.finished_ids,
            bitmask_req_ids=output.structured_ids,
            bitmask=bitmask,
            spec_req_ids=list(output.spec_token_ids),
            spec_token_ids=list(output.spec_token_ids.values()),
        )

    def _fill_bitmasks(self, req_ids: list[str]) -> TensorPayload:
        """The token masks of this step's constrained requests, one int32 row each (the layout
        of engine/structured_output.py). Every token before the one sampled now has been applied
        to each matcher (the scheduler sees to it). A matcher that fails ends its request with
        an error; its row allows everything and the token the step samples for it is dropped."""
        rows: Any = None
        failed: list[tuple[str, str]] = []
        for index, req_id in enumerate(req_ids):
            request = self.scheduler.get_request(req_id)
            grammar = None if request is None else request.grammar
            if grammar is None:  # cannot happen: the scheduler lists live constrained requests
                raise RuntimeError(f"step lists {req_id!r} as constrained but it has no grammar")
            if rows is None:
                rows = allocate_bitmask(len(req_ids), grammar.vocab_size)
            try:
                grammar.fill_bitmask(rows[index])
            except GrammarStateError as exc:
                rows[index] = -1
                failed.append((req_id, str(exc)))
        for req_id, error in failed:
            logger.error("%s: request %r: %s", self.name, req_id, error)
            live = self._live.get(req_id)
            self.scheduler.finish_requests([req_id], FinishReason.ERROR)
            if live is not None:
                self._finish(live, FinishReason.ERROR.value, live.detokenizer.flush(), [], None, error=error)
        self._timer.lap("fill token masks")
        return TensorPayload.from_numpy(rows)

    def _add_prompt_logprobs(self, results: list[PromptLogprobs]) -> None:
        """Gather a step's prompt logprobs by position: a position already held (a chunk
        recomputed after a worker restart) is not added again."""
        for item in results:
            live = self._live.get(item.req_id)
            if live is None or live.prompt_logprobs is None:
                continue
            gathered = live.prompt_logprobs
            prompt = live.request.prompt_token_ids
            if item.first_position > len(gathered):  # cannot happen: the workers score in order
                logger.error("%s: prompt logprobs of %r from position %d, %d expected",
                             self.name, item.req_id, item.first_position, len(gathered))
                continue
            end = min(item.first_position + len(item.entries), len(prompt))
            for position in range(len(gathered), end):
                entry = item.entries[position - item.first_position]
                top = list(zip(entry.top_token_ids, entry.top_logprobs, strict=True))
                gathered.append(TokenLogprob(prompt[position], entry.logprob, top, entry.rank))

    def _publish_all(self, updates: list[RequestUpdate]) -> None:
        """Detokenize every update of a step in one batch, then publish each in order."""
        pairs = [(self._live.get(u.request.request_id), u) for u in updates]
        live_pairs = [(live, u) for live, u in pairs if live is not None]
        if not live_pairs:
            return
        decoded = update_batch([live.detokenizer for live, _ in live_pairs], [_text_ids(u) for _, u in live_pairs])
        now = time.monotonic()  # one timestamp per step: its tokens arrived together
        for (live, update), (delta, stop_hit) in zip(live_pairs, decoded, strict=True):
            self._publish(live, update, delta, stop_hit, now)

    def _publish(self, live: _Live, update: RequestUpdate, delta: str, stop_hit: bool, now: float) -> None:
        new_token_ids = update.new_token_ids
        finish_reason = update.finish_reason
        if new_token_ids:
            self._generation_tokens += len(new_token_ids)
            self.request_metrics.on_tokens(now, live.request.arrival_time, live.last_token_at)
            if live.first_token_at is None:
                live.first_token_at = now
                self._ttft.append(now - live.arrival)
            elif live.last_token_at is not None:
                self._itl.append(now - live.last_token_at)
            live.last_token_at = now
        logprobs = _convert_logprobs(new_token_ids, update.new_logprobs) if live.want_logprobs else None
        if stop_hit and finish_reason is None:
            self.scheduler.finish_requests([live.request.request_id], FinishReason.STOP)
            finish_reason = FinishReason.STOP
        if finish_reason is not None:
            if not stop_hit:
                delta += live.detokenizer.flush()
            self._finish(live, finish_reason.value, delta, new_token_ids, logprobs, error=update.error)
            return
        if delta or new_token_ids:
            self._send(live, delta, new_token_ids, logprobs, finished=False, reason=None)

    def _finish(
        self,
        live: _Live,
        reason: str,
        delta: str,
        new_token_ids: list[int],
        logprobs: list[TokenLogprob] | None,
        *,
        error: str | None = None,
    ) -> None:
        self._finished[reason] += 1
        self._observe_finished(live)
        self._send(live, delta, new_token_ids, logprobs, finished=True, reason=reason, error=error)
        live.stream.close()
        del self._live[live.request.request_id]

    # ------------------------------------------------------------ request_metrics (histograms)
    def _note_scheduled(self, output: SchedulerOutput) -> None:
        now = time.monotonic()
        for new in output.scheduled_new:
            live = self._live.get(new.req_id)
            if live is not None and live.scheduled_at is None:
                live.scheduled_at = now
        self.request_metrics.on_step(output.total_num_scheduled_tokens)

    def _observe_finished(self, live: _Live) -> None:
        request = live.request
        params = request.sampling_params
        self.request_metrics.on_finished(
            time.monotonic(), arrival=request.arrival_time, queued=live.arrival, scheduled=live.scheduled_at,
            first_token=live.first_token_at, last_token=live.last_token_at,
            num_prompt_tokens=request.num_prompt_tokens, num_generation_tokens=request.num_output_tokens,
            # The request's own max_tokens, not one filled in from the model's defaults (as vLLM).
            max_tokens=None if "max_tokens" in getattr(params, "model_default_fields", ()) else params.max_tokens,
        )

    def _send(
        self,
        live: _Live,
        delta: str,
        new_token_ids: list[int],
        logprobs: list[TokenLogprob] | None,
        *,
        finished: bool,
        reason: str | None,
        error: str | None = None,
    ) -> None:
        request = live.request
        prompt_logprobs = None
        if live.prompt_logprobs is not None and new_token_ids:  # the first output with tokens
            prompt_logprobs, live.prompt_logprobs = live.prompt_logprobs, None
        # Positional, in field order (this runs once per token of every stream).
        out = RequestOutput(
            request.request_id,
            delta,
            live.detokenizer.text,
            list(new_token_ids),
            list(request.output_token_ids),
            logprobs,
            finished,
            reason,
            len(request.prompt_token_ids),
            len(request.output_token_ids),
            error,
            prompt_logprobs=prompt_logprobs,
        )
        try:
            live.stream.send_nowait(out)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            # The caller went away without aborting (e.g. its generator was collected).
            if not finished:
                self.abort(request.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine stopped: {exc!r}")
        for live in list(self._live.values()):
            try:
                live.stream.send_nowait(error)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            live.stream.close()
        self._live.clear()
        while True:
            try:
                command = self._inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if isinstance(command, _Submit):
                command.stream.send_nowait(error)
                command.stream.close()
        self._inbox_send.close()


def _text_ids(update: RequestUpdate) -> list[int]:
    """The new ids whose text the answer shows. As vLLM, the stop token that ended a request
    (an EOS id, unless ignore_eos, or a `stop_token_ids` entry) stays in `token_ids` but not
    in the text, unless `include_stop_str_in_output`; a grammar that finished on another
    token keeps it."""
    ids = update.new_token_ids
    if update.finish_reason is FinishReason.STOP and ids:
        request = update.request
        params = request.sampling_params
        last = ids[-1]
        if not params.include_stop_str_in_output and (
            last in params.stop_token_ids or (not params.ignore_eos and last in request.eos_token_ids)
        ):
            return ids[:-1]
    return ids


def _convert_logprobs(token_ids: list[int], entries: list[Any] | None) -> list[TokenLogprob] | None:
    if entries is None:
        return None
    out = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        if isinstance(entry, SampleLogprobs):
            top = list(zip(entry.top_token_ids, entry.top_logprobs, strict=True))
            out.append(TokenLogprob(token_id, entry.logprob, top, entry.rank))
    return out
