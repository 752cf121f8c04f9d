"""End to end through `Engine.start` with SmolLM2: greedy tokens equal Hugging Face `generate`."""

from __future__ import annotations

import pathlib

import anyio
import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from support.prompts import MAX_TOKENS, PROMPTS

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


async def _generate_all(engine: Engine, prompts: list[str], params: SamplingParams) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {}

    async def one(prompt: str) -> None:
        async for out in engine.generate(prompt, params):
            if out.finished:
                results[prompt] = out.token_ids

    async with anyio.create_task_group() as tg:
        for prompt in prompts:
            tg.start_soon(one, prompt)
    return results


@pytest.mark.parametrize("transport", ["shm", "tcp", "inproc"])
async def test_greedy_matches_hf_generate(
    transport: str, smollm2_dir: pathlib.Path, hf_greedy: dict[str, list[int]]
) -> None:
    cfg = EngineConfig(model=str(smollm2_dir), transport=transport, max_model_len=512, num_kv_blocks=256)  # type: ignore[arg-type]
    async with await Engine.start(cfg) as engine:
        got = await _generate_all(engine, PROMPTS, GREEDY)
        assert got == hf_greedy
        stats = engine.stats()
        assert stats.requests_finished.get("length") == len(PROMPTS)
        # Every request has finished, so no block is in use: the prefix cache keeps the blocks
        # it cached, but as free blocks (reusable, evicted when needed), never as used ones.
        kv = engine._cores[0].scheduler.kv_cache
        assert stats.num_kv_blocks_used == 0
        assert kv.num_free_blocks == stats.num_kv_blocks_total
        assert kv.num_cached_blocks > 0, "the prompts' full blocks were meant to stay cached"
        kv.check_invariants([])


async def test_preemption_chunked_prefill_keep_tokens(
    smollm2_dir: pathlib.Path, hf_greedy: dict[str, list[int]]
) -> None:
    """A KV pool too small for all requests at once forces preemption; a 16-token budget
    forces chunked prefill. Neither changes a greedy token."""
    cfg = EngineConfig(
        model=str(smollm2_dir), max_model_len=128, num_kv_blocks=20, block_size=4,
        max_num_batched_tokens=16, enable_prefix_caching=False,
    )  # fmt: skip
    async with await Engine.start(cfg) as engine:
        got = await _generate_all(engine, PROMPTS, GREEDY)
        stats = engine.stats()
        assert got == hf_greedy
        assert stats.num_preemptions > 0, "the pool was meant to be too small to hold every request"
        assert stats.num_kv_blocks_used == 0


async def test_prefix_caching_reuses_shared_prefix(
    smollm2_dir: pathlib.Path, hf_greedy: dict[str, list[int]]
) -> None:
    cfg = EngineConfig(model=str(smollm2_dir), max_model_len=512, num_kv_blocks=256, enable_prefix_caching=True)
    system = "You are a careful assistant who answers briefly and precisely. " * 4
    async with await Engine.start(cfg) as engine:
        first = await _generate_all(engine, [system + "Question: what is 2+2?"], GREEDY)
        computed_before = engine.stats().prompt_tokens_computed
        second = await _generate_all(engine, [system + "Question: what is 3+3?"], GREEDY)
        computed_second = engine.stats().prompt_tokens_computed - computed_before
        prompt_len = len(engine.tokenizer.encode(system + "Question: what is 3+3?", add_special_tokens=False))
        assert engine.stats().prefix_cache_hit_tokens > 0
        assert computed_second < prompt_len // 2, (computed_second, prompt_len)
        # Cached prefixes give the same tokens as computing from scratch.
        again = await _generate_all(engine, PROMPTS[:2], GREEDY)
    assert again == {p: hf_greedy[p] for p in PROMPTS[:2]}
    assert first and second


async def test_chat_and_stop_strings(smollm2_dir: pathlib.Path) -> None:
    cfg = EngineConfig(model=str(smollm2_dir), transport="inproc", max_model_len=512, num_kv_blocks=128)
    async with await Engine.start(cfg) as engine:
        text = ""
        async for out in engine.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(max_tokens=24, temperature=0.0),
        ):
            text += out.delta
            last = out
        assert "Paris" in text
        assert last.text == text and last.finished
        # A stop string never appears in the text and ends the request with 'stop'.
        full = ""
        async for out in engine.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=20, temperature=0.0)):
            full = out.text
        stop = full.strip().split(",")[2].strip()
        async for out in engine.generate(
            "1, 2, 3, 4, 5,", SamplingParams(max_tokens=20, temperature=0.0, stop=[stop])
        ):
            last = out
        assert last.finish_reason == "stop"
        assert stop not in last.text
        assert full.startswith(last.text)


@pytest.mark.slow
async def test_pipeline_parallel_smollm2_matches_hf(smollm2_dir: pathlib.Path, hf_greedy: dict[str, list[int]]) -> None:
    """SmolLM2's 30 layers split over two pipeline stages give the single-process tokens."""
    cfg = EngineConfig(model=str(smollm2_dir), pipeline_parallel_size=2, max_model_len=256, num_kv_blocks=128)
    async with await Engine.start(cfg) as engine:
        got = await _generate_all(engine, PROMPTS, GREEDY)
    assert got == hf_greedy
