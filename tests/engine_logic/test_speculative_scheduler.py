"""Speculative decoding, engine side: the n-gram proposer, the configuration, and the scheduler's
drafts and KV rollback against a deterministic fake model (no workers)."""

from __future__ import annotations

import argparse
import random

import pytest

from shardline.engine.cli_args import add_engine_args, engine_config_from_args
from shardline.engine.config import ConfigError, EngineConfig
from shardline.engine.kv_cache import KVCacheManager
from shardline.engine.request import FinishReason, Request, SamplingParams
from shardline.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from shardline.engine.speculative import (
    SpeculativeConfig,
    SpeculativeConfigError,
    propose_ngram,
    speculates,
)

VOCAB = 11


def fake_next(tokens: list[int]) -> int:
    """A deterministic 'greedy model': periodic enough for n-gram hits, not always right."""
    return (tokens[-1] * 3 + (tokens[-2] if len(tokens) > 1 else 0) + len(tokens) // 9) % VOCAB


# -- the proposer -------------------------------------------------------------------------------


def test_propose_ngram_takes_what_followed_the_most_recent_match() -> None:
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3]
    # Suffix [2, 3] occurs at 6 (most recent earlier occurrence): 7, 8 followed.
    assert propose_ngram(tokens, 2, 1, 2) == [7, 8]
    assert propose_ngram(tokens, 5, 1, 2) == [7, 8, 2, 3]  # up to the end of the context
    # The longest n first: [8, 2, 3] never occurred before, [2, 3] did.
    assert propose_ngram(tokens, 1, 2, 3) == [7]
    assert propose_ngram([1, 2, 3], 3, 1, 3) == []  # no earlier occurrence
    assert propose_ngram([5], 3, 1, 3) == []
    assert propose_ngram([4, 4, 4, 4], 2, 1, 2) == [4]  # the match ending just before the last


def test_propose_ngram_ignores_unaligned_byte_matches() -> None:
    # 256 = bytes 00 01 00 00, 1 = 01 00 00 00: the packed context holds the pattern's bytes at an
    # offset that is not a token boundary; no token-aligned match exists.
    assert propose_ngram([256, 0, 7, 1], 2, 1, 1) == []
    assert propose_ngram([256, 0, 1, 5, 1], 2, 1, 1) == [5, 1]


def test_propose_ngram_matches_a_brute_force_search() -> None:
    rng = random.Random(3)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        lo, hi, k = rng.randint(1, 3), rng.randint(3, 5), rng.randint(1, 5)
        expected: list[int] = []
        for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
            starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == tokens[-n:]]
            if starts:
                expected = tokens[starts[-1] + n : starts[-1] + n + k]
                break
        assert propose_ngram(tokens, k, lo, hi) == expected, (tokens, lo, hi, k)


# -- configuration ------------------------------------------------------------------------------


def test_config_parses_json_and_refuses_what_it_cannot_honour() -> None:
    tiny_config_kw: dict[str, object] = {"model": "smollm2-135m-instruct"}
    cfg = EngineConfig(
        **tiny_config_kw, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}'
    )  # type: ignore[arg-type]
    assert cfg.speculative == SpeculativeConfig("ngram", 3, 5, 5)  # vLLM's lookup defaults
    for given, bounds in (({"prompt_lookup_max": 3}, (3, 3)), ({"prompt_lookup_min": 2}, (2, 2))):
        spec = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, **given})
        assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == bounds
    assert EngineConfig(**tiny_config_kw).speculative is None  # type: ignore[arg-type]
    cases = {
        '{"method": "draft_model", "num_speculative_tokens": 2}': "'draft_model' needs a model",
        '{"model": "x", "num_speculative_tokens": 2, "prompt_lookup_min": 2}': "prompt_lookup_min is for",
        '{"method": "ngram", "model": "x", "num_speculative_tokens": 2}': "model is for method",
        '{"method": "eagle"}': "eagle",
        '{"num_speculative_tokens": 2}': "needs a method",
        '{"method": "ngram"}': "needs num_speculative_tokens",
        '{"method": "ngram", "num_speculative_tokens": 0}': "num_speculative_tokens",
        '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 2}': "prompt_lookup_min",
        "{not json": "not valid JSON",
        "[1, 2]": "JSON object",
    }
    for text, named in cases.items():
        with pytest.raises(ConfigError, match=named) as info:
            EngineConfig(**tiny_config_kw, speculative_config=text)  # type: ignore[arg-type]
        assert info.value.field == "speculative_config"
    with pytest.raises(SpeculativeConfigError, match="'draft_model' needs a model"):
        SpeculativeConfig("draft_model")
    spec = SpeculativeConfig.parse('{"model": "x", "num_speculative_tokens": 2}')  # as vLLM
    assert (spec.method, spec.model) == ("draft_model", "x")


def test_command_line_flag_is_json() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        [
            "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}',
        ]
    )
    cfg = engine_config_from_args(args)
    assert cfg.speculative == SpeculativeConfig("ngram", 4, 4, 1)


def test_requests_that_do_not_speculate() -> None:
    assert speculates(SamplingParams(temperature=0.0))
    assert speculates(SamplingParams(temperature=0.8))
    assert speculates(SamplingParams(temperature=0.8, top_k=1))
    for kw in (
        {"logit_bias": {3: 1.0}},
        {"min_tokens": 2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"repetition_penalty": 1.2},
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 0.8, "top_k": 5},
        {"temperature": 0.8, "min_p": 0.1},
    ):
        assert not speculates(SamplingParams(max_tokens=4, **kw)), kw  # type: ignore[arg-type]


# -- the scheduler: drafts, verification, rollback ----------------------------------------------


def _verify(
    out: SchedulerOutput, contexts: dict[str, list[int]]
) -> tuple[dict[str, int], dict[str, int]]:
    """What the workers would return for `out` under `fake_next`: per request the token after
    its accepted drafts, and how many drafts were accepted."""
    sampled: dict[str, int] = {}
    accepted: dict[str, int] = {}
    for req_id, end in out.computed_after.items():
        context = list(contexts[req_id])
        drafts = out.spec_token_ids.get(req_id, [])
        if end != len(context) + len(drafts):
            continue  # a partial prefill chunk
        count = 0
        for draft in drafts:
            if fake_next(context) != draft:
                break
            context.append(draft)
            count += 1
        sampled[req_id] = fake_next(context)
        accepted[req_id] = count
    return sampled, accepted


def _run(
    requests: list[Request],
    *,
    spec: SpeculativeConfig | None,
    num_blocks: int = 64,
    max_model_len: int = 64,
    block_size: int = 4,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=32,
        max_model_len=max_model_len,
        block_size=block_size,
        speculative=spec,
    )
    kv = KVCacheManager(num_blocks, block_size)
    scheduler = Scheduler(config, kv)
    for request in requests:
        scheduler.add_request(request)
    for _ in range(1000):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        kv.check_invariants(scheduler.running)
        contexts = {r.request_id: r.all_token_ids for r in requests}
        for req_id, drafts in out.spec_token_ids.items():
            request = scheduler.get_request(req_id)
            assert request is not None
            # The slots of every draft are allocated; the request is a decode.
            assert out.num_scheduled_tokens[req_id] == 1 + len(drafts)
            assert len(kv.get_block_ids(req_id)) * block_size >= request.num_tokens + len(drafts)
        sampled, accepted = _verify(out, contexts)
        scheduler.update_from_output(out, sampled, None, spec_accepted=accepted)
        kv.check_invariants(scheduler.running)
        for request in scheduler.running:
            # Rolled back: no block beyond what the computed tokens plus the next token need.
            assert len(kv.get_block_ids(request.request_id)) <= kv.blocks_needed(
                request.num_computed_tokens + 1
            )
    assert not scheduler.has_unfinished_requests()
    assert kv.num_free_blocks == num_blocks
    return scheduler


def _requests(**kw: object) -> list[Request]:
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 4, 4], [5, 7, 5, 7, 5], [9, 1, 0, 2, 9, 1]]
    params = SamplingParams(temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return [Request(f"r{i}", list(p), params, arrival_time=0.0) for i, p in enumerate(prompts)]


def _outputs(requests: list[Request]) -> list[tuple[list[int], FinishReason | None]]:
    return [(r.output_token_ids, r.finish_reason) for r in requests]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_tokens_equal_without_speculation(k: int) -> None:
    plain = _requests(max_tokens=37)
    _run(plain, spec=None)
    spec = _requests(max_tokens=37)
    scheduler = _run(spec, spec=SpeculativeConfig("ngram", k, 3, 1))
    assert _outputs(spec) == _outputs(plain)
    assert all(len(r.output_token_ids) == 37 for r in spec)  # max_tokens, never past it
    stats = scheduler.stats
    assert stats.spec_num_drafts > 0
    assert (
        0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    )  # some accepted, some rolled back
    assert sum(stats.spec_accepted_per_pos) == stats.spec_num_accepted_tokens
    assert len(stats.spec_accepted_per_pos) <= k


def test_stop_ids_and_context_limit_inside_an_accepted_run() -> None:
    plain = _requests(max_tokens=40, stop_token_ids=[9])
    _run(plain, spec=None, max_model_len=30)
    spec = _requests(max_tokens=40, stop_token_ids=[9])
    _run(spec, spec=SpeculativeConfig("ngram", 4, 3, 1), max_model_len=30)
    assert _outputs(spec) == _outputs(plain)
    reasons = {r.finish_reason for r in spec}
    assert FinishReason.STOP in reasons and FinishReason.LENGTH in reasons
    assert all(r.num_tokens <= 30 for r in spec)


def test_preemption_with_drafts_keeps_the_tokens() -> None:
    plain = _requests(max_tokens=30)
    _run(plain, spec=None, num_blocks=40, block_size=2)
    spec = _requests(max_tokens=30)
    scheduler = _run(spec, spec=SpeculativeConfig("ngram", 4, 3, 1), num_blocks=22, block_size=2)
    assert scheduler.stats.num_preemptions > 0
    assert _outputs(spec) == _outputs(plain)


def test_prefix_cache_holds_only_accepted_tokens() -> None:
    """After a run with rejected drafts, every cached block's hash is that of the request's
    actual tokens: a second request with the same context hits the cache for them."""
    config = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=64,
        block_size=2,
        speculative=SpeculativeConfig("ngram", 4, 3, 1),
    )
    kv = KVCacheManager(64, 2)
    scheduler = Scheduler(config, kv)
    first = Request(
        "a",
        [1, 2, 3, 1, 2, 3, 1, 2],
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        arrival_time=0.0,
    )
    scheduler.add_request(first)
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        sampled, accepted = _verify(out, {"a": first.all_token_ids})
        scheduler.update_from_output(out, sampled, None, spec_accepted=accepted)
    assert scheduler.stats.spec_num_accepted_tokens < scheduler.stats.spec_num_draft_tokens
    kv.check_invariants([])
    # Everything but the last token was computed: all full blocks of it are cached.
    context = first.all_token_ids
    second = Request("b", context, SamplingParams(max_tokens=1, temperature=0.0), arrival_time=0.0)
    _, num_cached = kv.get_computed_blocks(second)
    assert num_cached >= (len(context) - 1) // 2 * 2 - 2


# -- metrics and the stats line -----------------------------------------------------------------


def test_metrics_families_and_stats_line(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from shardline.engine.core import EngineStats
    from shardline.engine.server.metrics import ServerMetrics
    from shardline.engine.stats_logger import StatsLogger

    stats = EngineStats(
        num_kv_blocks_total=8,
        generation_tokens=30,
        spec_num_drafts=10,
        spec_num_draft_tokens=40,
        spec_num_accepted_tokens=25,
        spec_accepted_per_pos={0: 9, 1: 7, 2: 5, 3: 4},
    )
    config = EngineConfig(
        model="m", speculative_config={"method": "ngram", "num_speculative_tokens": 4}
    )
    engine = SimpleNamespace(config=config, stats=lambda: stats)
    text = generate_latest(ServerMetrics(lambda: engine, model_name="m").registry).decode()
    labels = 'engine="0",model_name="m"'
    assert f"shardline:spec_decode_num_drafts_total{{{labels}}} 10.0" in text
    assert f"shardline:spec_decode_num_draft_tokens_total{{{labels}}} 40.0" in text
    assert f"shardline:spec_decode_num_accepted_tokens_total{{{labels}}} 25.0" in text
    for position, count in stats.spec_accepted_per_pos.items():
        assert (
            f'shardline:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{position}"}} '
            f"{float(count)}" in text
        )
    # Without speculative decoding the families are not exported (as vLLM).
    plain = SimpleNamespace(config=EngineConfig(model="m"), stats=lambda: stats)
    assert (
        "spec_decode"
        not in generate_latest(ServerMetrics(lambda: plain, model_name="m").registry).decode()
    )

    caplog.set_level(logging.INFO, logger="shardline.stats")
    replicas = [EngineStats(num_kv_blocks_total=8)]
    logger = StatsLogger(lambda: replicas, 10.0, clock=lambda: 0.0)
    replicas[0] = stats  # tokens went through during the interval
    logger.tick()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "shardline.stats"]
    assert line.endswith("Draft acceptance rate: 62.5%, Mean acceptance length: 3.50")
