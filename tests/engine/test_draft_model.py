"""Speculative decoding with a draft model (engine/draft_model.py): greedy tokens equal to the
engine without speculation whatever the draft proposes (the target itself as its own draft: nearly
every draft accepted; another random model: most rejected), over shm, TP=2, PP=2 and tcp; sampled
requests; a draft model with another tokenizer refused at start naming both, nothing left running;
configuration errors; the draft engine failing mid-run (the target goes on)."""

from __future__ import annotations

import os
import pathlib
import signal

import anyio
import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.config import ConfigError
from shardline.engine.speculative import SpeculativeConfig
from support.generation import check_idle, generate_all
from support.tiny_models import make_tiny_model_dir

PROMPTS: list[str | list[int]] = [
    "hello world, the draft model",
    [5, 6, 7, 8, 9, 10, 11],
    "abc",
    "a longer prompt that spans several blocks of four tokens each",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _spec(draft: pathlib.Path, k: int = 3) -> dict[str, object]:
    return {"model": str(draft), "num_speculative_tokens": k}


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(model=str(path), max_model_len=256, num_kv_blocks=128, block_size=4)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Another random model with the same tokenizer (its proposals are mostly wrong)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("draft"), num_layers=1, hidden_size=32,
                               num_heads=2, num_kv_heads=1, intermediate_size=64, seed=7)


async def _run(cfg: EngineConfig, params: SamplingParams = GREEDY) -> tuple[list[list[int]], object]:
    async with await Engine.start(cfg) as engine:
        tokens = await generate_all(engine, PROMPTS, params)
        stats = check_idle(engine)
        drafter = engine._drafter
        assert drafter is not None
        draft_stats = drafter.engine.stats()
        assert (draft_stats.num_running, draft_stats.num_waiting) == (0, 0)
    return tokens, stats


def test_config_names_the_method_and_refuses_what_it_cannot_honour(tmp_path: pathlib.Path) -> None:
    spec = SpeculativeConfig.parse({"model": "m", "num_speculative_tokens": 2})
    assert (spec.method, spec.model, spec.num_speculative_tokens) == ("draft_model", "m", 2)
    with pytest.raises(ConfigError, match="needs a model"):
        _cfg(tmp_path, speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ConfigError, match="prompt_lookup_max is for method 'ngram'"):
        _cfg(tmp_path, speculative_config={"model": "m", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    with pytest.raises(ConfigError, match="model is for method 'draft_model'"):
        _cfg(tmp_path, speculative_config={"method": "ngram", "model": "m", "num_speculative_tokens": 2})


async def test_greedy_equal_with_itself_and_another_model_as_draft(
    tiny_llama_dir: pathlib.Path, other_draft_dir: pathlib.Path
) -> None:
    reference, _ = await _run_plain(_cfg(tiny_llama_dir))
    same, stats = await _run(_cfg(tiny_llama_dir, speculative_config=_spec(tiny_llama_dir)))
    assert same == reference
    # The target as its own draft: its greedy tokens, so (rounding aside) every draft holds.
    assert stats.spec_num_drafts > 0
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens
    other, stats = await _run(_cfg(tiny_llama_dir, speculative_config=_spec(other_draft_dir)))
    assert other == reference
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens


async def _run_plain(cfg: EngineConfig) -> tuple[list[list[int]], object]:
    async with await Engine.start(cfg) as engine:
        return await generate_all(engine, PROMPTS, GREEDY), engine.stats()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}, {"transport": "tcp"}])
async def test_greedy_equal_tp2_pp2_tcp(tiny_llama_dir: pathlib.Path, extra: dict[str, object]) -> None:
    reference, _ = await _run_plain(_cfg(tiny_llama_dir))
    got, stats = await _run(_cfg(tiny_llama_dir, speculative_config=_spec(tiny_llama_dir), **extra))
    assert got == reference, extra
    assert stats.spec_num_accepted_tokens > 0


async def test_sampled_requests_speculate_and_seeds_repeat(tiny_llama_dir: pathlib.Path) -> None:
    """temperature 1, seeded: drafts are verified by rejection sampling (a greedy draft is a
    point-mass proposal); the same seed gives the same tokens again."""
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    cfg = _cfg(tiny_llama_dir, speculative_config=_spec(tiny_llama_dir))
    first, stats = await _run(cfg, params)
    again, _ = await _run(cfg, params)
    assert first == again
    assert all(len(t) == 24 for t in first)
    assert stats.spec_num_drafts > 0


async def test_a_draft_model_with_another_tokenizer_is_refused(
    tiny_llama_dir: pathlib.Path, smollm2_dir: pathlib.Path
) -> None:
    with pytest.raises(ConfigError, match="does not share the tokenizer") as info:
        await Engine.start(_cfg(tiny_llama_dir, speculative_config=_spec(smollm2_dir)))
    assert str(smollm2_dir) in str(info.value)
    # (the session fixture checks that no process or shared memory was left behind)
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        assert len((await generate_all(engine, PROMPTS[:1], GREEDY))[0]) == GREEDY.max_tokens


async def test_the_target_goes_on_when_the_draft_engine_dies(tiny_llama_dir: pathlib.Path) -> None:
    reference, _ = await _run_plain(_cfg(tiny_llama_dir))
    async with await Engine.start(_cfg(tiny_llama_dir, speculative_config=_spec(tiny_llama_dir))) as engine:
        drafter = engine._drafter
        assert drafter is not None
        await drafter.engine.aclose()  # every proposal now fails
        got = await generate_all(engine, PROMPTS, GREEDY)
        assert engine.stats().spec_num_drafts == 0
    assert got == reference


async def test_the_draft_worker_killed_mid_stream_restarts_and_tokens_hold(
    tiny_llama_dir: pathlib.Path,
) -> None:
    """The draft engine's worker SIGKILLed while requests stream: the draft engine restarts its
    worker (the proposals in flight fail, those steps go without drafts), the target's tokens
    are the plain engine's, and drafting resumes."""
    reference, _ = await _run_plain(_cfg(tiny_llama_dir))
    cfg = _cfg(tiny_llama_dir, speculative_config=_spec(tiny_llama_dir), restart_backoff=0.1)
    async with await Engine.start(cfg) as engine:
        drafter = engine._drafter
        assert drafter is not None
        results: dict[int, list[int]] = {}
        streamed = anyio.Event()

        async def one(i: int) -> None:
            tokens: list[int] = []
            async for out in engine.generate(PROMPTS[i], GREEDY):
                tokens.extend(out.delta_token_ids)
                if len(tokens) >= 6:
                    streamed.set()
            results[i] = tokens

        async def kill() -> None:
            await streamed.wait()
            os.kill(drafter.engine._cores[0].executor.worker_pids[0], signal.SIGKILL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill)
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
        assert [results[i] for i in range(len(PROMPTS))] == reference
        assert drafter.engine.stats().num_restarts == 1
        drafted = engine.stats().spec_num_drafts
        assert await generate_all(engine, PROMPTS[:1], GREEDY) == reference[:1]
        assert engine.stats().spec_num_drafts > drafted  # drafting goes on after the restart
