"""Engine behaviour on a tiny random model: TP, concurrency, cancellation, seeds, bad input."""

from __future__ import annotations

import asyncio
import pathlib
import random
import time

import anyio
import pytest

from shardline.engine import (
    LLM,
    Engine,
    EngineConfig,
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
)
from support.generation import generate_all
from support.waiting import wait_until

PROMPTS = ["hello world", "the quick brown fox", "abc", "a longer prompt that spans a few blocks of tokens"]


async def _tokens(engine: Engine, prompt: str | list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens = out.token_ids
    return tokens




def _idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.num_kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(model=str(path), max_model_len=256, num_kv_blocks=128, block_size=4)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


async def test_tp2_matches_tp1(tiny_llama_dir: pathlib.Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        tp1 = await generate_all(engine, PROMPTS, params)
    async with await Engine.start(_cfg(tiny_llama_dir, tensor_parallel_size=2)) as engine:
        tp2 = await generate_all(engine, PROMPTS, params)
    assert tp1 == tp2
    assert all(len(t) == 12 for t in tp1)


async def test_concurrent_requests_with_cancellations(tiny_llama_dir: pathlib.Path) -> None:
    """200 concurrent generate calls, a third cancelled at random moments: the rest complete
    with the tokens they get alone, and afterwards every KV block is free."""
    rng = random.Random(7)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [f"request number {i} says " + "x" * rng.randint(0, 20) for i in range(200)]
    async with await Engine.start(_cfg(tiny_llama_dir, transport="inproc", num_kv_blocks=256, max_num_seqs=64)) as engine:
        results: dict[int, list[int]] = {}
        cancelled: set[int] = set()

        async def one(i: int) -> None:
            results[i] = await _tokens(engine, prompts[i], params)

        async def cancel_later(scope: anyio.CancelScope, i: int, delay: float) -> None:
            await anyio.sleep(delay)
            if i not in results:
                cancelled.add(i)
                scope.cancel()

        async def maybe_cancelled(i: int) -> None:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as inner:
                    if i % 3 == 0:
                        inner.start_soon(cancel_later, scope, i, rng.uniform(0.0, 1.0))
                    await one(i)
                    inner.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(maybe_cancelled, i)

        assert len(results) + len(cancelled) >= len(prompts)
        assert cancelled, "the test meant to cancel some requests mid-flight"
        # Aborts are processed by the loop; give it a moment, then nothing may be held.
        await wait_until(lambda: _idle(engine))
        # Every completed request got the tokens it gets alone: each prompt again, one at a
        # time (a batch of one), in the same engine.
        alone = {i: await _tokens(engine, prompts[i], params) for i in sorted(results)}
        assert all(len(tokens) == 16 for tokens in alone.values())
        differ = {i: (results[i], alone[i]) for i in sorted(results) if results[i] != alone[i]}
        assert not differ, f"{len(differ)} of {len(results)} completed requests differ from their tokens alone: {differ}"


async def test_seeded_sampling_is_reproducible_across_batches(tiny_llama_dir: pathlib.Path) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir, transport="inproc")) as engine:
        alone = await _tokens(engine, "seeded prompt", seeded)
        others = SamplingParams(max_tokens=16, temperature=1.2, ignore_eos=True)
        together: list[int] = []

        async def target() -> None:
            nonlocal together
            together = await _tokens(engine, "seeded prompt", seeded)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(_tokens, engine, f"noise {i}", others)
            tg.start_soon(target)
        unseeded_a = await _tokens(engine, "seeded prompt", SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert alone == together
    assert alone != unseeded_a


async def test_bad_input_raises_and_engine_keeps_serving(tiny_llama_dir: pathlib.Path) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    async with await Engine.start(_cfg(tiny_llama_dir, transport="inproc", max_model_len=64)) as engine:
        good = await _tokens(engine, "hello", params)
        with pytest.raises(InvalidRequestError) as err:
            await _tokens(engine, "", params)
        assert err.value.field == "prompt"
        with pytest.raises(PromptTooLongError):
            await _tokens(engine, "x" * 200, params)
        for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
            with pytest.raises(InvalidRequestError) as err:
                SamplingParams(**bad)  # type: ignore[arg-type]
            assert err.value.field == next(iter(bad))
        with pytest.raises(InvalidRequestError) as err:
            await _tokens(engine, "hello", SamplingParams(max_tokens=4, stop_token_ids=[10**9]))
        assert err.value.field == "stop_token_ids"
        with pytest.raises(InvalidRequestError):
            await _tokens(engine, [1, 2, -5], params)
        assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0
        assert await _tokens(engine, "hello", params) == good


async def test_event_loop_keeps_ticking_while_generating(tiny_llama_dir: pathlib.Path) -> None:
    """The engine lives in the caller's loop: another task must keep its 10 ms cadence."""
    async with await Engine.start(_cfg(tiny_llama_dir)) as engine:
        worst = 0.0
        done = anyio.Event()

        async def ticker() -> None:
            nonlocal worst
            last = time.monotonic()
            while not done.is_set():
                await anyio.sleep(0.01)
                now = time.monotonic()
                worst = max(worst, now - last)
                last = now

        async def work() -> None:
            await generate_all(engine, PROMPTS * 8, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(work)
    assert worst < 0.25, f"the caller's loop stalled for {worst * 1000:.0f} ms"


async def test_cancelling_the_consumer_aborts_the_request(tiny_llama_dir: pathlib.Path) -> None:
    async with await Engine.start(_cfg(tiny_llama_dir, transport="inproc")) as engine:
        got_first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate("cancel me", SamplingParams(max_tokens=200, ignore_eos=True)):
                got_first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_first.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: _idle(engine))
        assert engine.stats().requests_finished.get("abort") == 1
    with pytest.raises(EngineDeadError):
        await _tokens(engine, "after close", SamplingParams(max_tokens=2))


def test_offline_llm_batch(tiny_llama_dir: pathlib.Path) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(_cfg(tiny_llama_dir, transport="inproc")) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        again = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert [o.finished for o in outs] == [True] * len(PROMPTS)
    assert all(len(o.token_ids) == 8 for o in outs)
    assert again[0].token_ids == outs[0].token_ids
