"""Hypothesis stateful tests: every KV-cache invariant (DESIGN.md section 5, 1-7) and every
scheduler invariant (section 6) under random arrivals, lengths, aborts and pool sizes.

The machine drives Scheduler.schedule -> FakeWorker.execute -> Scheduler.update_from_output,
with aborts at any moment (including between schedule and update), and checks after each
rule: the block pool invariants, the step budget and sequence cap, bounded progress of
running requests, that aborted requests free their blocks and never appear again, and that
every finished request's tokens equal the fake model's reference (so preemption, chunked
prefill and prefix caching never change what is generated).

Three modes: the engine sends sampled tokens back to the workers ("sync"); the workers keep
their own samples ("keep"); and async scheduling ("async"), where step N+1 is scheduled and
executed before step N's result is applied, on placeholders the worker fills in.

The traffic is steered (small pools, nested shared prefixes, small step budgets, several
requests from the start, runs of many steps, aborts of preempted requests) so that the events
the invariants matter most for are common: test_machine_exercises_every_event counts them per
example with the machine's own counters and prints their shares (`pytest -s`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine_logic.fake_model import FakeWorker, reference_generate
from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from shardline.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 61
EOS = 7
# A few shared "system prompts" so prompts share prefixes and hit the prefix cache: nested
# (they share their beginnings too), and long enough to fill a 16-token block.
_SYSTEM = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]
SHARED_PREFIXES = [[], _SYSTEM[:8], _SYSTEM[:13], _SYSTEM[:18], _SYSTEM]

# What a run of the machine is meant to exercise; test_machine_exercises_every_event checks
# that each happens in at least MIN_EVENT_SHARE of the examples.
EVENTS = (
    "preemption",
    "prefix-cache hit",
    "LRU eviction",
    "abort of a preempted request",
    "chunked prefill",
    "sliding-window release",
)
MIN_EVENT_SHARE = 0.2

# The arguments of one add_request.
REQUEST = dict(
    prefix=st.sampled_from(SHARED_PREFIXES),
    tail=st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=40),
    max_tokens=st.integers(1, 40),
    ignore_eos=st.booleans(),
    stop_token=st.none() | st.integers(0, VOCAB - 1),
)


class SchedulerMachine(RuleBasedStateMachine):
    """Random traffic through a scheduler + KV cache + simulated worker."""

    def __init__(self) -> None:
        super().__init__()
        self.step_count = 0
        self.next_id = 0
        self.aborted: set[str] = set()
        self.finished: dict[str, Request] = {}
        self.outputs: dict[str, list[int]] = {}
        self.requests: dict[str, Request] = {}
        self.steps_without_progress: dict[str, int] = {}
        # Async mode: steps executed by the worker whose results are not applied yet.
        self.in_flight: list[tuple[SchedulerOutput, dict[str, int]]] = []
        # How often the events of EVENTS happened (preemptions and prefix hits are counted by
        # the scheduler itself).
        self.num_evictions = 0
        self.num_chunks = 0
        self.num_preempted_aborts = 0
        self.num_window_releases = 0

    # Each example's teardown appends the EVENTS it saw, while a test collects them.
    event_log: list[frozenset[str]] | None = None

    # Pools are mostly small (a tiny pool preempts and evicts), budgets mostly smaller than
    # a prompt (chunked prefill), prefix caching mostly on; large ones still come up.
    @initialize(
        block_size=st.sampled_from([1, 2, 4, 16]),
        max_model_len=st.integers(8, 64),
        extra_blocks=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 10, 1000]),
        max_num_seqs=st.sampled_from([2, 3, 4, 5, 6, 7, 8, 1]),
        budget_extra=st.sampled_from([0, 1, 2, 4, 8, 16]) | st.integers(0, 64),
        prefix_caching=st.sampled_from([True, True, True, False]),
        mode=st.sampled_from(["sync", "keep", "async"]),
        # A sliding-window model (every layer): blocks before the window go back to the pool.
        window=st.sampled_from([None, 2, 3, 5, 8]),
        initial=st.lists(st.fixed_dictionaries(REQUEST), min_size=2, max_size=8),
        drain_seed=st.integers(0, 2**32 - 1),
    )
    def setup(
        self,
        block_size: int,
        max_model_len: int,
        extra_blocks: int,
        max_num_seqs: int,
        budget_extra: int,
        prefix_caching: bool,
        mode: str,
        window: int | None,
        initial: list[dict[str, Any]],
        drain_seed: int,
    ) -> None:
        # The smallest pool that still holds one maximal request ("tiny") up to a large one.
        num_blocks = math.ceil(max_model_len / block_size) + extra_blocks
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_seqs + budget_extra,
            max_model_len=max_model_len,
            block_size=block_size,
            enable_prefix_caching=prefix_caching,
            workers_keep_sampled=mode != "sync",
            async_scheduling=mode == "async",
        )
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching, sliding_window=window)
        self.scheduler = Scheduler(self.config, self.kv)
        self.worker = FakeWorker(
            num_blocks, block_size, VOCAB, keep_sampled=mode != "sync", window=window
        )
        # With a window, what a running request may hold: the window, one step's tokens and
        # one step in flight (whose blocks are not released before it finished), block-rounded.
        budget = self.config.max_num_batched_tokens
        self.held_bound = (
            None if window is None else (max(window, budget) + budget) // block_size + 3
        )
        # Upper bound on steps a running request can wait: everything ahead of it in the
        # running list needs at most max_model_len tokens each.
        self.progress_bound = (
            math.ceil(max_num_seqs * max_model_len / self.config.max_num_batched_tokens) + 1
        ) + (mode == "async")  # a request whose last token is in flight sits out one step
        # Traffic from the start: an example never idles on an empty scheduler.
        for spec in initial:
            self.add_request(**spec)
        # Which preempted requests teardown aborts while it runs everything to completion.
        self.drain_rng = random.Random(drain_seed)

    # -- rules ---------------------------------------------------------------------------------

    @rule(**REQUEST)
    def add_request(
        self,
        prefix: list[int],
        tail: list[int],
        max_tokens: int,
        ignore_eos: bool,
        stop_token: int | None,
    ) -> None:
        prompt = (prefix + tail)[: self.config.max_model_len - 1] or [0]
        max_tokens = min(max_tokens, self.config.max_model_len - len(prompt))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=ignore_eos,
            stop_token_ids=() if stop_token is None else (stop_token,),
        )
        req_id = f"req-{self.next_id}"
        self.next_id += 1
        request = Request(req_id, prompt, params, eos_token_ids={EOS}, arrival_time=self.next_id)
        self.scheduler.add_request(request)
        self.requests[req_id] = request

    @rule()
    def step(self) -> None:
        self._step(abort_midway=None)

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(count=st.integers(2, 40), data=st.data())
    def several_steps(self, count: int, data: st.DataObject) -> None:
        """Run on for a while (requests grow, finish, and need blocks others hold); a request
        preempted on the way may be aborted while it waits to recompute."""
        for _ in range(count):
            self._step(abort_midway=None)
            self._check_all()
            preempted = self._preempted_ids()
            if preempted and data.draw(st.booleans()):
                self._abort([data.draw(st.sampled_from(preempted))])

    @precondition(lambda self: self.scheduler.num_running > 0)
    @rule(data=st.data())
    def step_with_abort_midway(self, data: st.DataObject) -> None:
        """Abort a scheduled request after schedule() and before its result comes back."""
        self._step(abort_midway=data)

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        live = sorted(r.request_id for r in self.requests.values() if not r.is_finished)
        req_id = data.draw(st.sampled_from(live))
        self._abort([req_id])

    @precondition(lambda self: bool(self._preempted_ids()))
    @rule(data=st.data())
    def abort_preempted(self, data: st.DataObject) -> None:
        """Abort a request that was preempted and waits to recompute."""
        self._abort([data.draw(st.sampled_from(self._preempted_ids()))])

    @rule()
    def abort_unknown_is_ignored(self) -> None:
        assert self.scheduler.finish_requests(["no-such-request"], FinishReason.ABORT) == []

    # -- driving -------------------------------------------------------------------------------

    def _preempted_ids(self) -> list[str]:
        return sorted(r.request_id for r in self.scheduler.waiting if r.status is RequestStatus.PREEMPTED)

    def _abort(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            request = self.scheduler.get_request(req_id)
            if request is not None and request.status is RequestStatus.PREEMPTED:
                self.num_preempted_aborts += 1
        for request in self.scheduler.finish_requests(req_ids, FinishReason.ABORT):
            self.aborted.add(request.request_id)
            assert request.status is RequestStatus.FINISHED
            assert self.kv.get_block_ids(request.request_id) == []

    def _step(self, abort_midway: st.DataObject | None) -> None:
        running_before = {r.request_id for r in self.scheduler.running}
        # Only eviction drops a hash from the cache map, and schedule() adds none.
        cached_before = self.kv.num_cached_blocks
        out = self.scheduler.schedule()
        self.num_evictions += cached_before - self.kv.num_cached_blocks
        self.num_window_releases += sum(
            self.kv.num_released_blocks(r.request_id) for r in self.scheduler.running
        )
        self.step_count += 1
        self._check_step(out, running_before)
        # The engine sends only non-empty steps; the worker runs them in order.
        sampled = self.worker.execute(out) if not out.is_empty else {}
        # The workers know exactly the live requests they were sent, plus the finished ones
        # they will hear of with the next step.
        sent = {r.request_id for r in self.requests.values() if r.num_tokens_sent > 0}
        live_sent = {i for i in sent if self.scheduler.get_request(i) is not None}
        expected = live_sent | set(self.scheduler.unreported_finished_ids)
        assert set(self.worker.requests) == expected, "worker state leaked or missing"
        if abort_midway is not None and out.num_scheduled_tokens:
            victim = abort_midway.draw(st.sampled_from(sorted(out.num_scheduled_tokens)))
            self._abort([victim])
        if self.config.async_scheduling:
            # Step N+1 has run; now apply step N (or this one, when nothing else is in flight).
            if not out.is_empty:
                self.in_flight.append((out, sampled))
            if not self.in_flight or (len(self.in_flight) < 2 and not out.is_empty):
                return
            out, sampled = self.in_flight.pop(0)
        self._apply(out, sampled)

    def _apply(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        updates = self.scheduler.update_from_output(out, sampled)
        for update in updates:
            req_id = update.request.request_id
            assert req_id not in self.aborted, "an aborted request received a token"
            self.outputs.setdefault(req_id, []).extend(update.new_token_ids)
            assert self.outputs[req_id] == update.request.output_token_ids
            if update.finish_reason is not None:
                assert self.kv.get_block_ids(req_id) == [], "finished request still holds blocks"
                self.finished[req_id] = update.request
                self._check_reference(update.request, complete=True)

    def _check_step(self, out: SchedulerOutput, running_before: set[str]) -> None:
        scheduled = out.num_scheduled_tokens
        # Budget and sequence cap.
        assert out.total_num_scheduled_tokens == sum(scheduled.values())
        assert out.total_num_scheduled_tokens <= self.config.max_num_batched_tokens
        assert len(scheduled) <= self.config.max_num_seqs
        assert self.scheduler.num_running <= self.config.max_num_seqs
        assert all(n > 0 for n in scheduled.values())
        ids = [d.req_id for d in out.scheduled_new] + [d.req_id for d in out.scheduled_cached]
        assert sorted(ids) == sorted(scheduled), "step records disagree with the token map"
        # Aborted/finished requests never appear in a later step.
        for req_id in scheduled:
            assert req_id not in self.aborted and req_id not in self.finished
        # Nothing is computed that only a token past max_tokens would need (async scheduling
        # must not run ahead of a request's last token).
        for req_id, end in out.computed_after.items():
            request = self.requests[req_id]
            assert end <= request.num_prompt_tokens + request.sampling_params.max_tokens - 1
            if end < request.num_tokens:
                self.num_chunks += 1  # a prefill (or recompute) that stops short of its tokens
        # Preempted requests are not scheduled in the same step (their blocks are gone).
        assert not set(out.preempted_ids) & set(scheduled)
        # Progress: a running request that was not preempted is scheduled within the bound.
        running_now = {r.request_id for r in self.scheduler.running}
        for req_id in running_before:
            if req_id in out.preempted_ids or req_id not in running_now:
                self.steps_without_progress.pop(req_id, None)
                continue
            if req_id in scheduled:
                self.steps_without_progress[req_id] = 0
            else:
                waited = self.steps_without_progress.get(req_id, 0) + 1
                self.steps_without_progress[req_id] = waited
                assert waited <= self.progress_bound, f"{req_id} starved for {waited} steps"

    def _check_reference(self, request: Request, *, complete: bool) -> None:
        params = request.sampling_params
        expected = reference_generate(
            request.prompt_token_ids,
            params.max_tokens,
            VOCAB,
            request.eos_token_ids,
            params.ignore_eos,
            params.stop_token_ids,
        )
        if complete:
            assert request.output_token_ids == expected, (
                f"{request.request_id} (preempted {request.num_preemptions}x) generated "
                f"{request.output_token_ids}, reference {expected}"
            )
        else:
            assert request.output_token_ids == expected[: request.num_output_tokens]

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def kv_cache_invariants(self) -> None:
        if not hasattr(self, "kv"):
            return
        self.kv.check_invariants(self.scheduler.running)
        if self.held_bound is not None:
            for request in self.scheduler.running:
                held = self.kv.held_block_ids(request.request_id)
                assert len(held) <= self.held_bound, (
                    f"{request.request_id} holds {len(held)} blocks"
                )
        for request in self.scheduler.waiting:
            assert self.kv.get_block_ids(request.request_id) == []
            assert request.num_computed_tokens == 0

    @invariant()
    def partial_outputs_match_reference(self) -> None:
        for request in self.requests.values():
            self._check_reference(request, complete=False)

    def _check_all(self) -> None:
        """The invariants, between the steps of a rule that runs several."""
        self.kv_cache_invariants()
        self.partial_outputs_match_reference()

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        # Run everything to completion (the invariants checked after every step; a preempted
        # request aborted now and then): it must finish, match the reference, leak nothing.
        live_ids = {r.request_id for r in self.requests.values() if not r.is_finished}
        max_steps = 4 * (len(live_ids) + 1) * self.config.max_model_len + 10
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests() and not self.in_flight:
                break
            self._step(abort_midway=None)
            self._check_all()
            preempted = self._preempted_ids()
            if preempted and self.drain_rng.random() < 0.5:
                self._abort([self.drain_rng.choice(preempted)])
        assert not self.scheduler.has_unfinished_requests(), "requests did not finish"
        assert not self.in_flight
        for req_id in live_ids:
            assert req_id in self.finished or req_id in self.aborted
        self._log_events()
        # An empty step is not sent; the last finished requests go out with the next one.
        unreported = self.scheduler.unreported_finished_ids
        out = self.scheduler.schedule()
        assert out.is_empty and not out.scheduled_new and not out.scheduled_cached
        assert set(self.worker.requests) == set(unreported)
        self.add_request([], [1], 1, True, None)
        out = self.scheduler.schedule()
        assert out.finished_ids == unreported
        self.worker.execute(out)
        assert set(self.worker.requests) == set(out.num_scheduled_tokens)
        self._abort(list(out.num_scheduled_tokens))
        # Invariant 6: everything finished or aborted -> every block free.
        self.kv.check_invariants([])
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert self.kv.num_used_blocks == 0 and self.kv.usage == 0.0

    def _log_events(self) -> None:
        """Record which EVENTS this example saw (when a test collects them)."""
        if SchedulerMachine.event_log is None:
            return
        counts = (
            self.scheduler.stats.num_preemptions,
            self.scheduler.stats.prefix_cache_hit_tokens,
            self.num_evictions,
            self.num_preempted_aborts,
            self.num_chunks,
            self.num_window_releases,
        )
        SchedulerMachine.event_log.append(frozenset(e for e, n in zip(EVENTS, counts, strict=True) if n))


SchedulerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase


def test_machine_exercises_every_event() -> None:
    """Preemption, prefix-cache hits, LRU eviction, aborting a preempted request and chunked
    prefill each happen in at least MIN_EVENT_SHARE of the examples, so the invariants above
    are checked under each of them. A fixed, derandomized run: the same shares every time."""
    from hypothesis.stateful import run_state_machine_as_test

    log: list[frozenset[str]] = []
    SchedulerMachine.event_log = log
    try:
        run_state_machine_as_test(
            SchedulerMachine,
            settings=settings(
                max_examples=100,
                stateful_step_count=50,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        SchedulerMachine.event_log = None
    counts = Counter(event for example in log for event in example)
    shares = {event: counts[event] / len(log) for event in EVENTS}
    print(f"events in {len(log)} examples: " + ", ".join(f"{e} {s:.0%}" for e, s in shares.items()))
    rare = {e: f"{s:.0%}" for e, s in shares.items() if s < MIN_EVENT_SHARE}
    assert not rare, f"events in under {MIN_EVENT_SHARE:.0%} of {len(log)} examples: {rare}"


def _held_blocks(kv: KVCacheManager, prompt: list[int]) -> Request:
    """A request of `prompt` whose blocks are computed and cached (as after its prefill)."""
    request = Request(f"r{len(prompt)}-{prompt[0]}", prompt, SamplingParams(max_tokens=4), eos_token_ids={EOS})
    assert kv.allocate_slots(request, len(prompt)) is not None
    request.num_computed_tokens = len(prompt)
    kv.cache_full_blocks(request)
    return request


def test_kv_invariant_checker_is_read_only() -> None:
    kv = KVCacheManager(8, 2)
    request = _held_blocks(kv, [1, 2, 3, 4, 5])
    # A request whose hash chain is shorter than its cached blocks: the checker must not fill
    # it in (that would hide incremental hashing that fell behind or went wrong).
    del request.block_hashes[1:]
    hashes = list(request.block_hashes)
    state = (list(kv._free), dict(kv._cached), list(kv._block_hash), list(kv._ref_cnt), dict(kv._hashed_prefix))
    kv.check_invariants([request])
    assert request.block_hashes == hashes
    assert (list(kv._free), dict(kv._cached), list(kv._block_hash), list(kv._ref_cnt), dict(kv._hashed_prefix)) == state


def test_kv_invariant_checker_catches_broken_state() -> None:
    kv = KVCacheManager(8, 2)
    request = _held_blocks(kv, [1, 2, 3, 4, 5])
    kv.check_invariants([request])
    table = kv.get_block_ids(request.request_id)
    # A wrong incremental hash (the checker recomputes the chain from the tokens).
    good = request.block_hashes[1]
    request.block_hashes[1] = b"\x00" * 16
    with pytest.raises(AssertionError, match="block hashes of request .* do not match its tokens"):
        kv.check_invariants([request])
    request.block_hashes[1] = good
    # A block both free and in a table.
    kv._free[table[0]] = None
    with pytest.raises(AssertionError, match=r"inv1: blocks \[\d+\] are in the free list and in a table"):
        kv.check_invariants([request])
    del kv._free[table[0]]
    # Two blocks holding the same hash (the map can name only one of them).
    spare = next(iter(kv._free))
    kv._block_hash[spare] = kv._block_hash[table[0]]
    with pytest.raises(AssertionError, match="inv4: blocks .* hold the same hash"):
        kv.check_invariants([request])
    kv._block_hash[spare] = None
    kv.check_invariants([request])


@pytest.mark.slow
def test_scheduler_machine_heavy() -> None:
    """The same machine with many more and longer runs."""
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        SchedulerMachine,
        settings=settings(
            max_examples=400,
            stateful_step_count=120,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
