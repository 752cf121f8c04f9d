"""Speculative decoding (n-gram) end to end through Engine.generate: greedy tokens equal to the
engine without speculation (tiny model on shm, TP=2, PP=2, tcp; the default model on an input-grounded
prompt), logprobs, stop strings, max_tokens, streaming, preemption, a worker killed mid-stream,
seeded sampling."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal

import anyio
import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.config import ConfigError
from support.generation import check_idle, generate_all

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'
# Token-id prompts with repeats (n-gram hits), and text ones.
PROMPTS: list[str | list[int]] = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [1, 2, 3, 1, 2, 3, 1, 2],
    "hello world hello world hello",
    "abcabcabcab",
]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(
        model=str(path), max_model_len=256, num_kv_blocks=128, block_size=4
    )
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


async def _run(
    cfg: EngineConfig, prompts: list[str | list[int]], params: SamplingParams
) -> tuple[list[list[int]], Engine]:
    async with await Engine.start(cfg) as engine:
        tokens = await generate_all(engine, prompts, params)
        check_idle(engine)
    return tokens, engine


async def test_greedy_equal_shm_tp2_pp2_tcp_and_streams_several_tokens(
    tiny_llama_dir: pathlib.Path,
) -> None:
    reference, _ = await _run(_cfg(tiny_llama_dir), PROMPTS, GREEDY)
    with pytest.raises(ConfigError, match="method 'eagle' is not supported"):  # naming the method
        _cfg(tiny_llama_dir, speculative_config='{"method": "eagle", "num_speculative_tokens": 2}')
    for extra in (
        {},
        {"tensor_parallel_size": 2},
        {"pipeline_parallel_size": 2},
        {"transport": "tcp"},
    ):
        cfg = _cfg(tiny_llama_dir, speculative_config=SPEC, **extra)
        async with await Engine.start(cfg) as engine:
            deltas: list[int] = []
            async for out in engine.generate(PROMPTS[0], GREEDY):
                deltas.append(len(out.delta_token_ids))
            assert max(deltas) > 1  # accepted drafts arrive together
            assert sum(deltas) == GREEDY.max_tokens
            got = await generate_all(engine, PROMPTS, GREEDY)
            stats = engine.stats()
        assert got == reference, extra
        assert (
            stats.spec_num_drafts > 0
            and 0 < stats.spec_num_accepted_tokens <= stats.spec_num_draft_tokens
        )
        assert sum(stats.spec_accepted_per_pos.values()) == stats.spec_num_accepted_tokens


def _spec(method: str, tiny_llama_dir: pathlib.Path) -> str:
    """n-gram drafts, or the target as its own draft model (engine/draft_model.py)."""
    if method == "ngram":
        return SPEC
    return json.dumps({"model": str(tiny_llama_dir), "num_speculative_tokens": 4})


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
async def test_logprobs_stop_strings_and_max_tokens(tiny_llama_dir: pathlib.Path, method: str) -> None:
    params = SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True, logprobs=2)
    outs: dict[bool, list[object]] = {}
    for spec in (False, True):
        cfg = _cfg(tiny_llama_dir, **({"speculative_config": _spec(method, tiny_llama_dir)} if spec else {}))
        async with await Engine.start(cfg) as engine:
            finals: list[object] = []
            for prompt in PROMPTS:
                last, logprobs = None, []
                async for out in engine.generate(prompt, params):
                    last = out
                    logprobs += out.logprobs or []  # each output carries its new tokens' entries
                finals.append((last, logprobs))
            outs[spec] = finals
            # A stop string from the middle of the plain output: the text ends before it.
            text = outs[False][2][0].text  # type: ignore[index]
            stop = text[len(text) // 2 : len(text) // 2 + 2]
            async for out in engine.generate(
                PROMPTS[2], SamplingParams(max_tokens=33, temperature=0.0, stop=[stop])
            ):
                last = out
            outs[spec].append((last.text, last.finish_reason))  # type: ignore[union-attr]
    for (plain, plain_lp), (spec_out, spec_lp) in zip(
        outs[False][:-1], outs[True][:-1], strict=True
    ):  # type: ignore[misc]
        assert spec_out.token_ids == plain.token_ids
        assert len(spec_out.token_ids) == 33
        assert spec_out.text == plain.text
        for a, b in zip(plain_lp, spec_lp, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert outs[True][-1] == outs[False][-1]
    assert outs[True][-1][1] == "stop"  # type: ignore[index]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
async def test_preemption_and_worker_restart_keep_the_tokens(tiny_llama_dir: pathlib.Path, method: str) -> None:
    prompts: list[str | list[int]] = [*PROMPTS, *[f"x{i} y{i} x{i} y{i} x{i}" for i in range(6)]]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reference, _ = await _run(_cfg(tiny_llama_dir), prompts, params)
    spec = _spec(method, tiny_llama_dir)
    # 40 blocks of 4 tokens for 10 requests growing to ~45 tokens: preemptions.
    cfg = _cfg(tiny_llama_dir, speculative_config=spec, num_kv_blocks=40, max_num_seqs=10)
    async with await Engine.start(cfg) as engine:
        got = await generate_all(engine, prompts, params)
        assert engine.stats().num_preemptions > 0
    assert got == reference
    # A worker SIGKILLed mid-stream: the group restarts, every request recomputes and goes on.
    cfg = _cfg(tiny_llama_dir, speculative_config=spec, tensor_parallel_size=2, restart_backoff=0.1)
    async with await Engine.start(cfg) as engine:
        results: dict[int, list[int]] = {}
        streamed = anyio.Event()

        async def one(i: int) -> None:
            tokens: list[int] = []
            async for out in engine.generate(prompts[i], params):
                tokens.extend(out.delta_token_ids)
                if len(tokens) >= 8:
                    streamed.set()
            results[i] = tokens

        async def kill() -> None:
            await streamed.wait()
            executor = engine._cores[0].executor
            os.kill(random.Random(1).choice(executor.worker_pids), signal.SIGKILL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill)
            for i in range(len(prompts)):
                tg.start_soon(one, i)
        assert engine.stats().num_restarts == 1
        assert [results[i] for i in range(len(prompts))] == reference


async def test_seeded_sampling_repeats_and_refused_options_still_serve(
    tiny_llama_dir: pathlib.Path,
) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)
    cfg = _cfg(tiny_llama_dir, speculative_config=SPEC)
    async with await Engine.start(cfg) as engine:
        first = await generate_all(engine, PROMPTS, params)
        second = await generate_all(engine, PROMPTS, params)
        # Requests that do not speculate (penalties, top-p) run beside them.
        other = await generate_all(
            engine,
            PROMPTS,
            SamplingParams(
                max_tokens=24, temperature=0.8, top_p=0.9, repetition_penalty=1.1, ignore_eos=True
            ),
        )
    assert first == second
    assert all(len(t) == 24 for t in first + other)


async def test_default_model_input_grounded_greedy_equal(smollm2_dir: pathlib.Path) -> None:
    text = (
        "The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great lamp, "
        "and wrote the weather in a leather logbook before the ships came past the rocks."
    )
    messages = [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{text}"}]
    params = SamplingParams(max_tokens=48, temperature=0.0)
    outs = []
    for spec in (False, True):
        cfg = EngineConfig(
            model=str(smollm2_dir),
            max_model_len=512,
            **({"speculative_config": SPEC} if spec else {}),
        )  # type: ignore[arg-type]
        async with await Engine.start(cfg) as engine:
            last = None
            async for out in engine.chat(messages, params):
                last = out
            outs.append(last)
            stats = engine.stats()
    assert outs[1].token_ids == outs[0].token_ids  # type: ignore[union-attr]
    assert (
        stats.spec_num_accepted_tokens > stats.spec_num_draft_tokens // 3
    )  # n-gram hits often here


async def _scored_beside_greedy(
    engine: Engine, prompt: str, scored: SamplingParams
) -> tuple[list[int], list[object]]:
    """PROMPTS[0] greedy, and `prompt` (with prompt logprobs) once the first has started."""
    first: list[int] = []
    started = anyio.Event()
    prompt_lp: list[object] = []

    async def speculating() -> None:
        async for out in engine.generate(PROMPTS[0], GREEDY):
            first[:] = out.token_ids
            started.set()

    async def scoring() -> None:
        await started.wait()
        tokens: list[int] = []
        async for out in engine.generate(prompt, scored):
            if out.prompt_logprobs is not None:
                prompt_lp.extend(out.prompt_logprobs)
            tokens = out.token_ids
        prompt_lp.append(tokens)

    async with anyio.create_task_group() as tg:
        tg.start_soon(speculating)
        tg.start_soon(scoring)
    return first, prompt_lp


async def test_prompt_logprobs_request_beside_a_speculating_one(
    tiny_llama_dir: pathlib.Path,
) -> None:
    """A prefill with prompt logprobs in the same steps as another request's drafts: both get
    what they get without speculation."""
    long_prompt = "the cat sat on the mat and the dog sat on the log " * 3
    scored = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2)
    results = {}
    for spec in (False, True):
        cfg = _cfg(tiny_llama_dir, **({"speculative_config": SPEC} if spec else {}))
        async with await Engine.start(cfg) as engine:
            results[spec] = await _scored_beside_greedy(engine, long_prompt, scored)
    assert results[True][0] == results[False][0]
    plain_lp, spec_lp = results[False][1], results[True][1]
    assert len(plain_lp) == len(spec_lp) > 10
    for a, b in zip(plain_lp[1:-1], spec_lp[1:-1], strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3  # type: ignore[attr-defined]
    assert plain_lp[-1] == spec_lp[-1]
