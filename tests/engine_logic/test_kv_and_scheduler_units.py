"""Focused scenarios for the KV cache and scheduler (the state machine covers random ones)."""

from __future__ import annotations

import pytest

from engine_logic.fake_model import FakeWorker, reference_generate
from shardline.engine.errors import PromptTooLongError
from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import FinishReason, Request, SamplingParams
from shardline.engine.scheduler import Scheduler, SchedulerConfig

VOCAB = 50


def make_request(req_id: str, prompt: list[int], max_tokens: int = 5, **kw: object) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return Request(req_id, prompt, params, arrival_time=0.0)


def run_to_completion(scheduler: Scheduler, worker: FakeWorker, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return
        out = scheduler.schedule()
        scheduler.kv_cache.check_invariants(scheduler.running)
        scheduler.update_from_output(out, worker.execute(out))
        scheduler.kv_cache.check_invariants(scheduler.running)
    raise AssertionError("requests did not finish")


def test_allocate_returns_none_without_side_effects() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    big = make_request("big", list(range(13)))
    assert kv.allocate_slots(big, 13) is None
    assert kv.num_free_blocks == 3 and kv.get_block_ids("big") == []
    small = make_request("small", list(range(12)))
    assert kv.allocate_slots(small, 12) == [0, 1, 2]
    assert kv.usage == 1.0


def test_prefix_hit_never_covers_the_whole_prompt_and_lru_evicts_tail_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    first = make_request("a", list(range(8)))
    kv.allocate_slots(first, 8)
    first.num_computed_tokens = 8
    kv.cache_full_blocks(first)
    kv.free("a")
    assert kv.num_free_blocks == 4 and kv.num_cached_blocks == 2
    # Same 8-token prompt: only the first block may be reused (the last token must be computed).
    again = make_request("b", list(range(8)))
    blocks, num_tokens = kv.get_computed_blocks(again)
    assert (blocks, num_tokens) == ([0], 4)
    # A longer prompt reuses both.
    longer = make_request("c", list(range(9)))
    assert kv.get_computed_blocks(longer) == ([0, 1], 8)
    # Allocating three fresh blocks evicts the two empty blocks first, then the tail of the
    # cached prefix (block 1), keeping its head (block 0).
    other = make_request("d", [40] * 12)
    assert kv.allocate_slots(other, 12) == [2, 3, 1]
    other.num_computed_tokens = 12
    kv.check_invariants([other])
    with pytest.raises(AssertionError, match="inv6"):
        kv.check_invariants([])  # "d" still holds blocks: reported as a leak
    assert kv.get_computed_blocks(longer) == ([0], 4)
    assert kv.num_cached_blocks == 1


def test_chunked_prefill_samples_only_after_the_last_chunk() -> None:
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=4, max_model_len=64, block_size=4,
        long_prefill_token_threshold=4,  # chunks by the step budget here (the cap: test_prefill_fairness)
    )
    kv = KVCacheManager(16, 4)
    scheduler = Scheduler(config, kv)
    worker = FakeWorker(16, 4, VOCAB)
    prompt = list(range(1, 11))
    scheduler.add_request(make_request("r", prompt, max_tokens=3))
    chunks = []
    for _ in range(3):
        out = scheduler.schedule()
        chunks.append(out.num_scheduled_tokens["r"])
        sampled = worker.execute(out)
        updates = scheduler.update_from_output(out, sampled)
        assert bool(updates) == (sum(chunks) == len(prompt))
    assert chunks == [4, 4, 2]
    run_to_completion(scheduler, worker)
    assert scheduler.stats.prompt_tokens_computed == len(prompt)


def test_preempted_request_resumes_with_the_same_tokens() -> None:
    # 6 blocks of 2 tokens: two requests that each grow to 10 tokens cannot both fit.
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=64, max_model_len=16, block_size=2
    )
    kv = KVCacheManager(6, 2, enable_prefix_caching=False)
    scheduler = Scheduler(config, kv)
    worker = FakeWorker(6, 2, VOCAB)
    prompts = {"a": [1, 2, 3, 4], "b": [9, 8, 7, 6]}
    requests = {k: make_request(k, p, max_tokens=6) for k, p in prompts.items()}
    for request in requests.values():
        scheduler.add_request(request)
    resumed = []
    for _ in range(100):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        resumed += [c for c in out.scheduled_cached if c.resumed]
        scheduler.update_from_output(out, worker.execute(out))
        kv.check_invariants(scheduler.running)
    assert scheduler.stats.num_preemptions > 0
    # A resumed request gets its whole new table (covering every token it has K/V for).
    assert resumed
    for data in resumed:
        assert len(data.new_block_ids) == -(
            -(data.num_computed_tokens + data.num_scheduled_tokens) // 2
        )
    # The most recently started request ("b") was the one preempted.
    assert requests["b"].num_preemptions > 0 and requests["a"].num_preemptions == 0
    for key, request in requests.items():
        assert request.finish_reason is FinishReason.LENGTH
        assert request.output_token_ids == reference_generate(prompts[key], 6, VOCAB, (), True)
    assert kv.num_free_blocks == 6


def test_prefix_caching_saves_prompt_computation() -> None:
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=4
    )
    kv = KVCacheManager(32, 4)
    scheduler = Scheduler(config, kv)
    worker = FakeWorker(32, 4, VOCAB)
    shared = list(range(1, 21))
    first = make_request("first", shared + [30, 31])
    scheduler.add_request(first)
    run_to_completion(scheduler, worker)
    computed_before = scheduler.stats.prompt_tokens_computed
    second = make_request("second", shared + [40])
    scheduler.add_request(second)
    run_to_completion(scheduler, worker)
    assert second.num_cached_tokens == 20
    assert scheduler.stats.prefix_cache_hit_tokens == 20
    assert scheduler.stats.prompt_tokens_computed - computed_before == 1
    assert second.output_token_ids == reference_generate(shared + [40], 5, VOCAB, (), True)


def test_stop_conditions() -> None:
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=12, block_size=4
    )
    kv = KVCacheManager(32, 4)
    scheduler = Scheduler(config, kv)
    worker = FakeWorker(32, 4, VOCAB)
    prompt = [3, 1, 4, 1, 5]
    expected = reference_generate(prompt, 7, VOCAB, (), True)
    eos = expected[2]
    cases = {
        "eos": Request("eos", prompt, SamplingParams(max_tokens=7), eos_token_ids={eos}),
        "ignore": Request("ignore", prompt, SamplingParams(max_tokens=7, ignore_eos=True), {eos}),
        "stop_id": Request(
            "stop_id", prompt, SamplingParams(max_tokens=7, stop_token_ids=[expected[1]])
        ),
        "length": Request("length", prompt, SamplingParams(max_tokens=4)),
        # Several EOS ids (a generation_config.json list): whichever comes first ends it.
        "eos_list": Request("eos_list", prompt, SamplingParams(max_tokens=7), frozenset({VOCAB + 1, eos})),
    }
    for request in cases.values():
        scheduler.add_request(request)
    run_to_completion(scheduler, worker)
    assert cases["eos"].finish_reason is FinishReason.STOP
    assert cases["eos"].output_token_ids == expected[: expected.index(eos) + 1]
    assert cases["ignore"].finish_reason is FinishReason.LENGTH
    assert cases["ignore"].output_token_ids == expected
    assert cases["stop_id"].finish_reason is FinishReason.STOP
    assert cases["stop_id"].output_token_ids == expected[: expected.index(expected[1]) + 1]
    assert cases["length"].finish_reason is FinishReason.LENGTH
    assert cases["length"].num_output_tokens == 4
    assert cases["eos_list"].finish_reason is FinishReason.STOP
    assert cases["eos_list"].output_token_ids == cases["eos"].output_token_ids


def test_abort_between_schedule_and_update() -> None:
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32, block_size=4
    )
    kv = KVCacheManager(16, 4)
    scheduler = Scheduler(config, kv)
    worker = FakeWorker(16, 4, VOCAB)
    scheduler.add_request(make_request("a", [1, 2, 3]))
    scheduler.add_request(make_request("b", [4, 5, 6]))
    out = scheduler.schedule()
    sampled = worker.execute(out)
    [aborted] = scheduler.finish_requests(["a", "unknown"], FinishReason.ABORT)
    assert aborted.finish_reason is FinishReason.ABORT and kv.get_block_ids("a") == []
    updates = scheduler.update_from_output(out, sampled)
    assert [u.request.request_id for u in updates] == ["b"]
    assert aborted.output_token_ids == []
    following = scheduler.schedule()
    assert following.finished_ids == ["a"]
    assert "a" not in following.num_scheduled_tokens
    # An aborted request never sent to the workers is not reported to them.
    scheduler.add_request(make_request("c", [7]))
    scheduler.finish_requests(["c"], FinishReason.ABORT)
    assert "c" not in scheduler.schedule().finished_ids


def test_request_larger_than_the_pool_is_refused() -> None:
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=4
    )
    scheduler = Scheduler(config, KVCacheManager(3, 4))
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        scheduler.add_request(make_request("r", list(range(10)), max_tokens=3))
    scheduler.add_request(make_request("ok", list(range(10)), max_tokens=2))
    assert scheduler.num_waiting == 1
