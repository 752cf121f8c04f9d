"""A long prompt shares each step with the others (issue 20, item 6): its prefill chunks are
capped, so a short request behind it starts in the next step. The tokens are the same."""

from __future__ import annotations

from engine_logic.fake_model import FakeWorker, reference_generate
from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import Request, SamplingParams
from shardline.engine.scheduler import Scheduler, SchedulerConfig

VOCAB = 50


def _request(req_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                   arrival_time=0.0)


def _scheduler(threshold: int = 0) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=2048, block_size=4,
                             long_prefill_token_threshold=threshold)
    return Scheduler(config, KVCacheManager(num_blocks=1024, block_size=4))


def _steps_until_first_token(scheduler: Scheduler, worker: FakeWorker, req_id: str) -> tuple[int, dict[str, list[int]]]:
    tokens: dict[str, list[int]] = {}
    first = None
    for step in range(1, 200):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        assert out.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        for update in scheduler.update_from_output(out, worker.execute(out)):
            tokens.setdefault(update.request.request_id, []).extend(update.new_token_ids)
        if first is None and tokens.get(req_id):
            first = step
    assert first is not None
    return first, tokens


def test_a_short_request_behind_a_long_prompt_starts_in_the_next_step() -> None:
    long_prompt = [(7 * i) % VOCAB for i in range(2000)]
    short_prompt = [3, 1, 4]
    scheduler, worker = _scheduler(), FakeWorker(num_blocks=1024, block_size=4, vocab_size=VOCAB)
    scheduler.add_request(_request("long", long_prompt))
    scheduler.add_request(_request("short", short_prompt))
    first, tokens = _steps_until_first_token(scheduler, worker, "short")
    # Capped at 256 // 4 = 64 tokens, the long prompt leaves room: the short one prefills in
    # the first step (without the cap it waited for all 8 of the long prompt's 256-token chunks).
    assert first == 1
    assert tokens["short"] == reference_generate(short_prompt, 4, VOCAB, (), ignore_eos=True)
    assert tokens["long"] == reference_generate(long_prompt, 4, VOCAB, (), ignore_eos=True)


def test_a_long_prompt_alone_is_chunked_too() -> None:
    """Capped alone as well: a request arriving while its chunks are in flight (two steps
    with async scheduling) then waits for two small steps, not two whole budgets."""
    scheduler = _scheduler()
    scheduler.add_request(_request("long", list(range(40)) * 20))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"long": 64}


def test_the_threshold_is_a_setting() -> None:
    scheduler = _scheduler(threshold=100)
    scheduler.add_request(_request("a", list(range(40)) * 10))
    scheduler.add_request(_request("b", list(range(40)) * 10))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 100, "b": 100}
