"""Continuous batching: which requests run in the next step, and with how many tokens.

Each step is a map {request_id: num_tokens}: running requests first (one decode token, or the
next chunk of a long prefill), then waiting requests in arrival order, within
`max_num_batched_tokens` and `max_num_seqs`. When a running request's next block cannot be
allocated, the most recently started running request is preempted (recompute: its blocks are
freed and it goes back to the front of the waiting queue). `num_computed_tokens` advances when
a step is scheduled, so a step's tokens are `[num_computed_tokens, +num_scheduled_tokens)`.

What goes to the workers follows docs/INTERFACES.md section 1: a request's prompt, sampling
options and block table once (`NewRequestData`), then diffs (`CachedRequestData`) carrying the
tokens appended since the workers last saw it; after a preemption, `resumed=True` and
`new_block_ids` is the whole new table.

Async scheduling (`SchedulerConfig.async_scheduling`, replicas without pipeline stages): the next step is
scheduled while the current one runs, before its sampled tokens are known. A request whose step
will sample holds a *placeholder* for that token: it is scheduled again at once (one token at the
placeholder's position), and the worker, which sampled the token itself, feeds it in. When the
result arrives the placeholder becomes the token; the workers already have it, so it is never
sent back to them. A request is not scheduled past its `max_tokens` or the context limit on
placeholders; one that stops on EOS or a stop string wastes at most the one step in flight,
whose token is then dropped.

Structured output (`SamplingParams.structured_output`): a constrained request carries its
grammar matcher (`Request.grammar`). The mask of its next token depends on every token before
it, so it is never scheduled while a token of it is still a placeholder (it waits out the step
in flight: its row sits out the overlapped step, the free requests do not wait). Each step lists
the constrained requests that sample in it (`SchedulerOutput.structured_ids`; the engine core
fills their masks); `update_from_output` advances the matcher with each sampled token: a grammar
that can take nothing more finishes the request with "stop" (whatever `ignore_eos`), a token the
grammar refuses (the mask forbade it: a bug) finishes it with "error".
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shardline.engine.errors import PromptTooLongError
from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from shardline.engine.speculative import SpeculativeConfig, propose_ngram, speculates
from shardline.engine.structured_output import GrammarMatcher, GrammarStateError

logger = logging.getLogger("shardline.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step and of the context."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    workers_keep_sampled: bool = False
    """The workers append the tokens they sample to their own request state (replicas without
    pipeline stages: every TP rank samples), so sampled tokens are never sent back to them."""
    async_scheduling: bool = False
    """Schedule the next step while the current one runs (needs workers_keep_sampled)."""
    long_prefill_token_threshold: int = 0
    """A prefill chunk takes at most this many tokens of a step (0: max_num_batched_tokens //
    4), so a long prompt leaves room in every step for other requests' decodes and prefills,
    including those that arrive while its chunks are in flight."""
    speculative: SpeculativeConfig | None = None
    """Speculative decoding (engine/speculative.py): decode steps of requests that may
    speculate carry n-gram draft tokens (`SchedulerOutput.spec_token_ids`). Not with
    async_scheduling."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.async_scheduling and not self.workers_keep_sampled:
            raise ValueError("async_scheduling needs workers that keep their sampled tokens")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("SchedulerConfig.long_prefill_token_threshold must be >= 0")
        if self.speculative is not None and self.async_scheduling:
            raise ValueError("speculative decoding does not run with async_scheduling")

    @property
    def prefill_chunk_cap(self) -> int:
        """The largest prefill chunk of one request in one step."""
        return self.long_prefill_token_threshold or max(1, self.max_num_batched_tokens // 4)


@dataclass
class NewRequestData:
    """A request the workers see for the first time."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    num_output_tokens: int = 0  # generated tokens included in prompt_token_ids (after a restart)


@dataclass
class CachedRequestData:
    """The diff for a request the workers already know."""

    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    resumed: bool


@dataclass
class SchedulerOutput:
    """One step: who runs with how many tokens, plus ids the workers must drop."""

    step_id: int
    scheduled_new: list[NewRequestData]
    scheduled_cached: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_ids: list[str]
    preempted_ids: list[str]
    # num_computed_tokens of each scheduled request once this step has run (internal use:
    # what update_from_output may register in the prefix cache).
    computed_after: dict[str, int] = field(default_factory=dict)
    # Constrained requests (Request.grammar) that sample in this step, in step order: their
    # token masks go out with the step.
    structured_ids: list[str] = field(default_factory=list)
    # Speculative decoding: the draft tokens each speculating request's step verifies (its
    # step computes its last token and these: 1 + len(drafts) tokens).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when no request has tokens to compute in this step."""
        return self.total_num_scheduled_tokens == 0


@dataclass
class RequestUpdate:
    """What one step did to one request: the tokens it appended and whether it finished."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[Any] | None
    finish_reason: FinishReason | None
    error: str | None = None  # why, when finish_reason is ERROR


@dataclass
class SchedulerStats:
    """Cumulative counters (read by engine stats and by tests)."""

    num_preemptions: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache (the hits' denominator)
    prompt_tokens_computed: int = 0
    tokens_computed: int = 0
    # Speculative decoding (vLLM's spec_decode counters): verified steps of a request with
    # drafts, draft tokens, accepted draft tokens, and accepted drafts by position (0-based).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)


class Scheduler:
    """Continuous-batching scheduler over a `KVCacheManager` (DESIGN.md section 6)."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        if kv_cache.block_size != config.block_size:
            raise ValueError(
                f"block sizes differ: scheduler {config.block_size}, kv cache {kv_cache.block_size}"
            )
        self.config = config
        self.kv_cache = kv_cache
        self.stats = SchedulerStats()
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        # Ordered by (re)start time: the last one is the first to be preempted.
        self._running: list[Request] = []
        self._finished_to_report: list[str] = []
        self._next_step_id = 0
        # Async scheduling: request id -> sampled tokens scheduled but not yet returned.
        self._placeholders: dict[str, int] = {}
        self.num_constrained = 0  # live requests with a grammar (Request.grammar)
        # Draft-model speculation: request id -> (context length, drafts) that the core set
        # before this step (`draft_candidates`, engine/draft_model.py); used once.
        self.draft_proposals: dict[str, tuple[int, list[int]]] = {}

    # -- queries -------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Request | None:
        """The live (unfinished) request with this id, if any."""
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        """Requests holding KV blocks (scheduled at least once since their last preemption)."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (new or preempted)."""
        return len(self._waiting)

    @property
    def unreported_finished_ids(self) -> list[str]:
        """Finished requests the workers still hold: they go out with the next step (a copy)."""
        return list(self._finished_to_report)

    @property
    def running(self) -> list[Request]:
        """The running requests, oldest start first (a copy)."""
        return list(self._running)

    @property
    def waiting(self) -> list[Request]:
        """The waiting requests in admission order (a copy)."""
        return list(self._waiting)

    # -- protocol ------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (already validated with `validate_request`).

        Raises PromptTooLongError when the request could not fit in the whole KV pool even
        alone: it would otherwise wait (or preempt itself) forever.
        """
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        max_tokens = min(
            request.num_prompt_tokens + request.sampling_params.max_tokens,
            self.config.max_model_len,
        )
        needed = self.kv_cache.blocks_to_hold(max_tokens, self.config.max_num_batched_tokens)
        if needed > self.kv_cache.num_blocks:
            raise PromptTooLongError(
                f"the prompt plus max_tokens ({max_tokens} tokens) needs {needed} KV blocks but "
                f"the cache has only {self.kv_cache.num_blocks} blocks of "
                f"{self.kv_cache.block_size} tokens"
            )
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._waiting.append(request)
        if request.grammar is not None:
            self.num_constrained += 1

    def schedule(self) -> SchedulerOutput:
        """Choose the next step's requests and token counts and reserve their KV slots."""
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(
            step_id=self._next_step_id,
            scheduled_new=[],
            scheduled_cached=[],
            num_scheduled_tokens={},
            total_num_scheduled_tokens=0,
            finished_ids=self._finished_to_report,
            preempted_ids=[],
        )
        self._next_step_id += 1
        self._finished_to_report = []

        # 1) Running requests: a decode token or the next prefill chunk each. A prefill chunk
        # is capped, so one long prompt cannot take every step's whole budget while short
        # requests wait behind it (nor the two steps in flight when one arrives).
        placeholders = self._placeholders
        cap = self.config.prefill_chunk_cap
        spec = self.config.speculative
        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            num_tokens = request.num_tokens
            pending = placeholders.get(request.request_id, 0) if placeholders else 0
            if pending and (request.grammar is not None or self._at_limit(request, pending)):
                # The step in flight samples its last token; or the request is constrained
                # and its next mask needs the token that step samples.
                index += 1
                continue
            num_new = min(num_tokens + pending - request.num_computed_tokens, budget, cap)
            if num_new <= 0:
                # Its sampled token has not come back yet (a step still in flight).
                index += 1
                continue
            new_blocks = None
            if spec is not None and num_new == 1 and budget > 1:
                # Draft tokens only where their slots fit without preempting anyone.
                drafts = self._propose(request, spec, budget - 1)
                if drafts:
                    new_blocks = self.kv_cache.allocate_slots(request, 1 + len(drafts))
                    if new_blocks is not None:
                        num_new += len(drafts)
                        out.spec_token_ids[request.request_id] = drafts
            if new_blocks is None:
                new_blocks = self._allocate_or_preempt(request, num_new, out)
            if new_blocks is None:
                break  # the request preempted itself; everything after it is gone too
            self._record_cached(request, num_new, new_blocks, out, resumed=False)
            budget -= num_new
            index += 1

        # 2) Waiting requests in arrival order. Not after a preemption: admitting new work
        # would just preempt it again next step.
        while (
            self._waiting
            and budget > 0
            and not out.preempted_ids
            and len(self._running) < self.config.max_num_seqs
        ):
            request = self._waiting[0]
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget, cap)
            new_blocks = self.kv_cache.allocate_slots(request, num_new, computed_blocks)
            if new_blocks is None:
                break  # first come, first served: nobody overtakes the head of the queue
            self._waiting.popleft()
            self._running.append(request)
            self.stats.prefix_cache_hit_tokens += num_cached
            if self.config.enable_prefix_caching:
                self.stats.prefix_cache_queries += request.num_tokens
            request.num_computed_tokens = num_cached
            if request.num_tokens_sent == 0:
                request.num_cached_tokens = num_cached
                self._record_new(request, num_new, new_blocks, out)
            else:
                self._record_cached(request, num_new, new_blocks, out, resumed=True)
            request.status = RequestStatus.RUNNING
            budget -= num_new

        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        if not out.total_num_scheduled_tokens and out.finished_ids:
            # An empty step is not sent: the workers hear of these with the next one.
            self._finished_to_report = out.finished_ids
            out.finished_ids = []
        return out

    def _max_drafts(self, request: Request, spec: SpeculativeConfig) -> int:
        """How many drafts a decode step of `request` may verify: never past its max_tokens or
        the context limit (the step also samples one token of its own); 0 if it may not
        speculate."""
        params = request.sampling_params
        if not speculates(params):
            return 0
        return min(
            spec.num_speculative_tokens,
            params.max_tokens - request.num_output_tokens - 1,
            self.config.max_model_len - request.num_tokens - 1,
        )

    def _propose(self, request: Request, spec: SpeculativeConfig, budget: int) -> list[int]:
        """Draft tokens for a decode step of `request`, at most `budget` (and `_max_drafts`)."""
        k = min(self._max_drafts(request, spec), budget)
        if k < 1:
            return []
        if spec.method == "draft_model":
            proposal = self.draft_proposals.pop(request.request_id, None)
            if proposal is None or proposal[0] != request.num_tokens:
                return []  # none made, or made for another context (it moved on since)
            return proposal[1][:k]
        return propose_ngram(request.all_token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max)

    def draft_candidates(self) -> list[tuple[str, list[int], int]]:
        """`(request id, context, k)` of every running request whose next step is a decode and
        that may speculate: what a draft model proposes for before the step is scheduled
        (engine/draft_model.py). Empty unless the method is "draft_model"."""
        spec = self.config.speculative
        if spec is None or spec.method != "draft_model":
            return []
        candidates = []
        for request in self._running:
            if request.num_computed_tokens != request.num_tokens - 1:
                continue  # still prefilling (or its token is not back yet)
            k = self._max_drafts(request, spec)
            if k >= 1:
                candidates.append((request.request_id, request.all_token_ids, k))
        return candidates

    def _allocate_or_preempt(
        self, request: Request, num_new: int, out: SchedulerOutput
    ) -> list[int] | None:
        """Allocate slots, preempting from the back of the running list until it fits.

        Returns None when `request` itself had to be preempted.
        """
        while True:
            new_blocks = self.kv_cache.allocate_slots(request, num_new)
            if new_blocks is not None:
                return new_blocks
            victim = self._running.pop()
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._waiting.appendleft(request)

    def _record_new(
        self, request: Request, num_new: int, block_ids: list[int], out: SchedulerOutput
    ) -> None:
        start = request.num_computed_tokens
        out.scheduled_new.append(
            NewRequestData(
                req_id=request.request_id,
                # Normally just the prompt; after a worker-group restart (see
                # `transfer_for_recompute`) also the tokens already generated, since the new
                # workers know nothing of the request.
                prompt_token_ids=request.all_token_ids,
                sampling_params=request.sampling_params,
                block_ids=list(block_ids),
                num_computed_tokens=start,
                num_scheduled_tokens=num_new,
                eos_token_ids=request.eos_token_ids,
                num_output_tokens=request.num_output_tokens,
            )
        )
        # Every token so far travels now; later output tokens follow as diffs.
        request.num_tokens_sent = request.num_tokens
        self._commit(request, start, num_new, out)

    def _record_cached(
        self,
        request: Request,
        num_new: int,
        new_blocks: list[int],
        out: SchedulerOutput,
        *,
        resumed: bool,
    ) -> None:
        start = request.num_computed_tokens
        block_ids = self.kv_cache.get_block_ids(request.request_id) if resumed else new_blocks
        # Only the tokens the workers have not seen: O(new tokens), never the whole context.
        # (positional, in field order: once per running request per step)
        out.scheduled_cached.append(
            CachedRequestData(
                request.request_id,
                request.token_ids_between(request.num_tokens_sent),
                list(block_ids),
                start,
                num_new,
                resumed,
            )
        )
        request.num_tokens_sent = request.num_tokens
        self._commit(request, start, num_new, out)

    def _at_limit(self, request: Request, pending: int) -> bool:
        """Whether the tokens already scheduled to be sampled reach max_tokens or the context."""
        return (
            request.num_output_tokens + pending >= request.sampling_params.max_tokens
            or request.num_tokens + pending >= self.config.max_model_len
        )

    def _commit(self, request: Request, start: int, num_new: int, out: SchedulerOutput) -> None:
        end = start + num_new
        request.num_computed_tokens = end
        if self.config.async_scheduling:
            req_id = request.request_id
            pending = self._placeholders.get(req_id, 0)
            if end == request.num_tokens + pending:  # this step samples: hold its token's place
                self._placeholders[req_id] = pending + 1
                if request.grammar is not None:  # (never with a placeholder pending: see schedule)
                    out.structured_ids.append(req_id)
        elif request.grammar is not None and end == request.num_tokens:
            out.structured_ids.append(request.request_id)
        out.num_scheduled_tokens[request.request_id] = num_new
        out.computed_after[request.request_id] = end
        stats = self.stats
        stats.tokens_computed += num_new
        prompt_end = len(request.prompt_token_ids)
        if start < prompt_end:  # (a decode step computes no prompt tokens)
            stats.prompt_tokens_computed += min(end, prompt_end) - start

    def update_from_output(
        self,
        out: SchedulerOutput,
        sampled: dict[str, int],
        logprobs: dict[str, Any] | None = None,
        spec_accepted: dict[str, int] | None = None,
        spec_logprobs: dict[str, list[Any]] | None = None,
    ) -> list[RequestUpdate]:
        """Apply a finished step: cache its full blocks, append sampled tokens, finish requests.

        Requests finished or preempted since `out` was scheduled are ignored, and so is a
        token for a request that should not have sampled (a partial prefill chunk).
        Speculative decoding: `spec_accepted` holds how many of each request's draft tokens
        (`out.spec_token_ids`) the workers accepted; `spec_logprobs` their logprobs entries.
        """
        updates: list[RequestUpdate] = []
        placeholders = self._placeholders
        keep_sampled = self.config.workers_keep_sampled
        spec_tokens = out.spec_token_ids
        for req_id in out.num_scheduled_tokens:
            request = self._requests.get(req_id)
            if request is None:
                continue
            computed_after = out.computed_after.get(req_id, request.num_computed_tokens)
            drafts = spec_tokens.get(req_id) if spec_tokens else None
            if drafts:
                num_accepted = (spec_accepted or {}).get(req_id, 0)
                computed_after = self._roll_back(request, drafts, num_accepted, computed_after)
                computed_after -= num_accepted  # (compared with num_tokens before appending)
            if request.status is RequestStatus.RUNNING:
                self.kv_cache.cache_full_blocks(request, computed_after)
            elif not placeholders.get(req_id):
                # Preempted since: its token is not wanted, unless this step held a
                # placeholder for it (async scheduling), which the workers fill in.
                continue
            token_id = sampled.get(req_id)
            if token_id is None or computed_after != request.num_tokens:
                continue
            if drafts:
                accepted = drafts[:num_accepted]
                entries = None if logprobs is None else logprobs.get(req_id)
                spec_entries = None if entries is None else [*(spec_logprobs or {}).get(req_id, []), entries]
                updates.append(self._apply_speculative(request, [*accepted, token_id], spec_entries))
                continue
            if placeholders:
                pending = placeholders.pop(req_id, 0)
                if pending > 1:
                    placeholders[req_id] = pending - 1
            if keep_sampled:
                request.num_tokens_sent += 1  # the worker appended it itself
            grammar = request.grammar
            if grammar is not None:
                error = _advance(grammar, token_id)
                if error is not None:
                    logger.error("request %r: %s", req_id, error)
                    updates.append(RequestUpdate(request, [], None, FinishReason.ERROR, error))
                    self._finish(request, FinishReason.ERROR)
                    continue
            request.output_token_ids.append(token_id)
            reason = self._stop_reason(request, token_id)
            if grammar is not None and grammar.is_finished():
                reason = FinishReason.STOP  # the output is complete (also with ignore_eos)
            token_logprobs = None if logprobs is None else logprobs.get(req_id)
            updates.append(
                RequestUpdate(
                    request, [token_id], None if token_logprobs is None else [token_logprobs], reason
                )
            )
            if reason is not None:
                self._finish(request, reason)
        return updates

    # -- speculative decoding -------------------------------------------------------------------

    def _roll_back(self, request: Request, drafts: list[int], num_accepted: int, computed_after: int) -> int:
        """Count a verified step and give back the slots of its rejected draft tokens: the
        request's computed tokens end after its accepted drafts, and a block that held only
        rejected ones is freed. Returns the computed tokens the step left."""
        if not 0 <= num_accepted <= len(drafts):
            raise RuntimeError(f"{num_accepted} of {len(drafts)} draft tokens accepted for {request.request_id!r}")
        stats = self.stats
        stats.spec_num_drafts += 1
        stats.spec_num_draft_tokens += len(drafts)
        stats.spec_num_accepted_tokens += num_accepted
        per_pos = stats.spec_accepted_per_pos
        if len(per_pos) < len(drafts):
            per_pos.extend([0] * (len(drafts) - len(per_pos)))
        for position in range(num_accepted):
            per_pos[position] += 1
        computed_after -= len(drafts) - num_accepted
        if request.status is RequestStatus.RUNNING:
            request.num_computed_tokens = computed_after  # (no later step in flight: not async)
            self.kv_cache.trim_to(request.request_id, computed_after)
        return computed_after

    def _apply_speculative(self, request: Request, token_ids: list[int], entries: list[Any] | None) -> RequestUpdate:
        """Append a verified step's tokens (accepted drafts, then the workers' own token) up to
        the first that ends the request; the rest are dropped."""
        if self.config.workers_keep_sampled:
            request.num_tokens_sent += len(token_ids)  # the workers appended them all
        appended: list[int] = []
        reason = None
        for token_id in token_ids:
            request.output_token_ids.append(token_id)
            appended.append(token_id)
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                break
        update = RequestUpdate(request, appended, None if entries is None else entries[: len(appended)], reason)
        if reason is not None:
            self._finish(request, reason)
        return update

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.sampling_params
        # Before min_tokens no stop id can end the request (the sampler does not pick them
        # then either; this also holds for an id the logits do not cover).
        if request.num_output_tokens > params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return FinishReason.STOP
            if token_id in params.stop_token_ids:
                return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def transfer_for_recompute(self, fresh: Scheduler) -> None:
        """Hand every live request to `fresh` (a scheduler over a new worker group's KV pool).

        The new workers hold no K/V and no request state, so each request starts over as new
        to them: it recomputes its prompt plus the tokens it already generated (recompute
        preemption, at group scale) and keeps its place in line: running requests first, in
        the order they started, then the waiting queue. Counters carry over.
        """
        self._placeholders.clear()  # the steps in flight are lost with the old workers
        for request in [*self._running, *self._waiting]:
            request.status = RequestStatus.WAITING
            request.num_computed_tokens = 0
            request.num_tokens_sent = 0
            fresh._requests[request.request_id] = request
            fresh._waiting.append(request)
        fresh.stats = self.stats
        fresh._next_step_id = self._next_step_id
        # Matchers stay on their requests, where every applied token left them: a recompute
        # computes those tokens again but samples none of them, so nothing re-advances.
        fresh.num_constrained = self.num_constrained
        self.num_constrained = 0
        self._requests.clear()
        self._running.clear()
        self._waiting.clear()
        self._finished_to_report.clear()

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[Request]:
        """Finish live requests (abort, stop string, error); unknown or finished ids are ignored.

        Their blocks are freed now; the workers hear about them in the next step's
        `finished_ids`.
        """
        finished: list[Request] = []
        for req_id in request_ids:
            request = self._requests.get(req_id)
            if request is None:
                continue
            self._finish(request, reason)
            finished.append(request)
        return finished

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.kv_cache.free(request.request_id)
        self._placeholders.pop(request.request_id, None)
        if request.grammar is not None:
            self.num_constrained -= 1
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]
        if request.num_tokens_sent > 0:
            # Only the workers that know a request need to drop it.
            self._finished_to_report.append(request.request_id)


def _advance(grammar: GrammarMatcher, token_id: int) -> str | None:
    """Advance a request's grammar over its sampled token; an error message when it cannot
    (the mask allowed a token the grammar refuses, or the matcher failed): never raises."""
    try:
        if grammar.accept((token_id,)):
            return None
        return f"structured output: the grammar refused sampled token {token_id}"
    except GrammarStateError as exc:
        return str(exc)
