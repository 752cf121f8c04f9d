"""Sliding-window KV freeing (issue 24): for a model whose every layer attends over a window,
the blocks wholly before the window of a request's next position go back to the pool (the
random traffic of test_scheduler_stateful covers windows too; these are focused scenarios).
The fake worker reads every position of the window and checks its K/V, so a block released
too early and reused by another request changes nothing silently: it fails."""

from __future__ import annotations

import pytest

from engine_logic.fake_model import FakeWorker, reference_generate
from shardline.engine.errors import PromptTooLongError
from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import Request, SamplingParams
from shardline.engine.scheduler import Scheduler, SchedulerConfig

VOCAB = 50
BLOCK = 4
WINDOW = 8


def make_request(req_id: str, prompt: list[int], max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(req_id, prompt, params, arrival_time=0.0)


def make_scheduler(
    num_blocks: int, *, budget: int = 16, window: int | None = WINDOW, prefix_caching: bool = True
) -> tuple[Scheduler, FakeWorker]:
    config = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=budget,
        max_model_len=256,
        block_size=BLOCK,
        enable_prefix_caching=prefix_caching,
        long_prefill_token_threshold=budget,
    )
    kv = KVCacheManager(num_blocks, BLOCK, prefix_caching, sliding_window=window)
    return Scheduler(config, kv), FakeWorker(num_blocks, BLOCK, VOCAB, window=window)


def run(scheduler: Scheduler, worker: FakeWorker, on_step: object = None) -> list[int]:
    """Run to completion checking the invariants; returns the blocks in use after each step."""
    used = []
    for _ in range(1000):
        if not scheduler.has_unfinished_requests():
            return used
        out = scheduler.schedule()
        scheduler.kv_cache.check_invariants(scheduler.running)
        scheduler.update_from_output(out, worker.execute(out))
        scheduler.kv_cache.check_invariants(scheduler.running)
        used.append(scheduler.kv_cache.num_used_blocks)
    raise AssertionError("requests did not finish")


def test_long_generation_holds_about_the_window() -> None:
    # 20 prompt tokens + 100 generated = 30 blocks without a window; 12 blocks in the pool.
    scheduler, worker = make_scheduler(12)
    prompt = list(range(1, 21))
    request = make_request("long", prompt, 100)
    scheduler.add_request(request)
    used = run(scheduler, worker)
    assert request.output_token_ids == reference_generate(prompt, 100, VOCAB, (), True)
    # Decoding: the window's 8 tokens span at most 3 blocks, plus the block being written.
    assert max(used[-90:]) <= WINDOW // BLOCK + 2
    assert scheduler.kv_cache.num_used_blocks == 0
    # Released blocks kept their prefix hashes (free, cached, evictable).
    assert scheduler.kv_cache.num_cached_blocks > 0


def test_without_a_window_the_same_request_is_refused() -> None:
    scheduler, _ = make_scheduler(12, window=None)
    with pytest.raises(PromptTooLongError, match="needs 30 KV blocks but the cache has only 12"):
        scheduler.add_request(make_request("long", list(range(1, 21)), 100))


def test_window_bound_on_admission_names_the_blocks() -> None:
    # With the window a request needs (window - 1 + step) + step tokens of blocks, +2.
    kv = KVCacheManager(4, BLOCK, sliding_window=WINDOW)
    assert kv.blocks_to_hold(1000, 16) == (max(WINDOW - 1, 16) + 16) // BLOCK + 2
    assert kv.blocks_to_hold(6, 16) == 2  # never more than the tokens need
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=16, max_model_len=256, block_size=BLOCK
        ),
        kv,
    )
    with pytest.raises(PromptTooLongError, match="needs 10 KV blocks but the cache has only 4"):
        scheduler.add_request(make_request("r", list(range(1, 30)), 100))


def test_released_blocks_serve_other_requests_while_the_window_stays_intact() -> None:
    # Two long requests and a small pool: each reuses blocks the other released, and the fake
    # worker checks every position of every window against the tokens.
    scheduler, worker = make_scheduler(14, budget=8)
    prompts = {"a": list(range(1, 14)), "b": list(range(30, 41))}
    requests = {k: make_request(k, p, 60) for k, p in prompts.items()}
    for request in requests.values():
        scheduler.add_request(request)
    used = run(scheduler, worker)
    assert max(used) <= 14
    assert scheduler.stats.num_preemptions == 0
    for key, request in requests.items():
        assert request.output_token_ids == reference_generate(prompts[key], 60, VOCAB, (), True)


def test_prefix_hit_after_release_skips_blocks_before_the_window() -> None:
    scheduler, worker = make_scheduler(32)
    kv = scheduler.kv_cache
    shared = list(range(1, 25))  # 6 full blocks
    first = make_request("first", [*shared, 40], 10)
    scheduler.add_request(first)
    run(scheduler, worker)
    # A second request with the same 24-token prefix hits all six blocks; the first
    # 24 - 8 + 1 = 17 positions are before its window: blocks 0-3 are not taken (stale
    # entries), blocks 4-5 are.
    second = make_request("second", [*shared, 41], 10)
    scheduler.add_request(second)
    out = scheduler.schedule()
    assert second.num_cached_tokens == 24
    assert kv.num_released_blocks("second") == 4
    table = kv.get_block_ids("second")
    assert kv.held_block_ids("second") == table[4:]
    assert kv.num_used_blocks == len(table) - 4
    kv.check_invariants(scheduler.running)
    scheduler.update_from_output(out, worker.execute(out))
    run(scheduler, worker)
    assert second.output_token_ids == reference_generate([*shared, 41], 10, VOCAB, (), True)


def test_prefix_caching_off_and_preemption_with_a_window() -> None:
    # A pool too small for both requests' windows at once: one is preempted, recomputes and
    # still matches; nothing leaks.
    scheduler, worker = make_scheduler(5, budget=4, prefix_caching=False)
    prompts = {"a": list(range(1, 10)), "b": list(range(20, 29)), "c": list(range(30, 39))}
    requests = {k: make_request(k, p, 30) for k, p in prompts.items()}
    for request in requests.values():
        scheduler.add_request(request)
    run(scheduler, worker)
    assert scheduler.stats.num_preemptions > 0
    for key, request in requests.items():
        assert request.output_token_ids == reference_generate(prompts[key], 30, VOCAB, (), True)
    assert scheduler.kv_cache.num_free_blocks == 5


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sliding_window must be >= 1, got 0"):
        KVCacheManager(4, BLOCK, sliding_window=0)


def test_invariant_checker_catches_a_block_released_inside_the_window() -> None:
    kv = KVCacheManager(8, BLOCK, sliding_window=WINDOW)
    request = make_request("r", list(range(1, 13)), 4)
    kv.allocate_slots(request, 12)
    request.num_computed_tokens = 12
    kv.cache_full_blocks(request)
    kv.check_invariants([request])
    # Positions 5.. are in the window of position 12: block 1 (positions 4-7) must stay.
    for block_id in kv.get_block_ids("r")[:2]:  # released as _release_outside_window does
        kv._ref_cnt[block_id] -= 1
        kv._free[block_id] = None
    kv._released["r"] = 2
    with pytest.raises(
        AssertionError,
        match="inv8: request r released 2 blocks but its window starts at position 5",
    ):
        kv.check_invariants([request])
