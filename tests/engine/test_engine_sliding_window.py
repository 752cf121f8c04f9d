"""A model whose every layer attends over a sliding window (Mistral with `sliding_window`)
served end to end (issue 24): greedy tokens past the window equal transformers' `generate`
(prompt longer than the window), while the engine gives back the KV blocks before each
request's window (asserted from `engine.stats()` during the generation), and a request that
could never fit the pool whole runs in it; the prefix cache still gives transformers' tokens
to a second request sharing the prompt; TP=2 gives the same. A model with a global layer
(Gemma 3) keeps them."""

from __future__ import annotations

import pathlib

import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.errors import PromptTooLongError
from support import hf_tiny
from support.hf_tiny import SLIDING_WINDOW, make_hf_model_dir

BLOCK = 4
PROMPT = [
    72,
    101,
    108,
    108,
    111,
    32,
    119,
    111,
    114,
    108,
    100,
    33,
    32,
    84,
    104,
    101,
    32,
    113,
    117,
    105,
]
MAX_TOKENS = 40  # 20 + 40 tokens: 15 blocks of 4 without the window


def hf_greedy(path: pathlib.Path, prompt: list[int], max_tokens: int) -> list[int]:
    return hf_tiny.hf_greedy(path, [prompt], max_tokens)[0]


def config(path: pathlib.Path, **kw: object) -> EngineConfig:
    # A step computes at most 8 tokens: a request then holds at most
    # (max(window - 1, 8) + 8) / 4 + 2 = 6 blocks, so 8 blocks serve a 60-token request.
    base: dict[str, object] = dict(
        model=str(path),
        max_model_len=128,
        num_kv_blocks=8,
        block_size=BLOCK,
        max_num_batched_tokens=8,
    )
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


async def tokens_and_blocks(engine: Engine, prompt: list[int]) -> tuple[list[int], list[int]]:
    """The greedy tokens of `prompt` and the KV blocks in use after each streamed output."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: list[int] = []
    used: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens = out.token_ids
        used.append(engine.stats().num_kv_blocks_used)
    return tokens, used


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_hf_model_dir(tmp_path_factory.mktemp("mistral"), "MistralForCausalLM", seed=11)


async def test_tokens_past_the_window_equal_transformers_while_blocks_are_released(
    mistral: pathlib.Path,
) -> None:
    expected = hf_greedy(mistral, PROMPT, MAX_TOKENS)
    # A pool larger than the request: released blocks sit in the free list with their hashes.
    async with await Engine.start(config(mistral, num_kv_blocks=32)) as engine:
        tokens, used = await tokens_and_blocks(engine, PROMPT)
        assert tokens == expected
        # The window's 8 tokens span at most 3 blocks, plus the block being written (and one
        # step's lag in giving blocks back): never the 15 the whole context takes.
        assert max(used) <= SLIDING_WINDOW // BLOCK + 3, used
        assert engine.stats().num_kv_blocks_used == 0
        # A second request with the same prompt hits the released blocks' hashes (those
        # before its window are not even taken); its tokens are transformers' all the same.
        again, used = await tokens_and_blocks(engine, PROMPT)
        assert again == expected
        assert engine.stats().prefix_cache_hit_tokens == 16  # 4 full blocks (not the last token)
        assert max(used) <= SLIDING_WINDOW // BLOCK + 3, used


async def test_several_requests_share_the_pool_past_their_windows(mistral: pathlib.Path) -> None:
    # Two requests of 60 tokens (30 blocks together) in a 12-block pool.
    prompts = [PROMPT, PROMPT[5:] + [65, 66, 67, 68, 69]]
    expected = [hf_greedy(mistral, p, MAX_TOKENS) for p in prompts]
    async with await Engine.start(config(mistral, num_kv_blocks=12)) as engine:
        from support.generation import generate_all

        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        assert await generate_all(engine, prompts, params) == expected


async def test_a_model_with_a_global_layer_keeps_its_blocks(tmp_path: pathlib.Path) -> None:
    # Gemma 3 with one sliding and one global layer: the whole context stays, so a request of
    # 15 blocks is refused by an 8-block pool (naming both numbers), and the next one served.
    path = make_hf_model_dir(tmp_path / "gemma3", "Gemma3ForCausalLM", seed=12)
    async with await Engine.start(config(path)) as engine:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        with pytest.raises(PromptTooLongError, match="needs 15 KV blocks but the cache has only 8"):
            async for _ in engine.generate(PROMPT, params):
                pass
        short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        outputs = [out async for out in engine.generate(PROMPT[:8], short)]
        assert outputs[-1].token_ids == hf_greedy(path, PROMPT[:8], 4)


async def test_tensor_parallel_two_ranks_past_the_window(mistral: pathlib.Path) -> None:
    # TP=2 (one KV head a rank): the same tokens, and the blocks go back the same way.
    expected = hf_greedy(mistral, PROMPT, MAX_TOKENS)
    async with await Engine.start(config(mistral, tensor_parallel_size=2)) as engine:
        tokens, used = await tokens_and_blocks(engine, PROMPT)
        assert tokens == expected
        assert max(used) <= SLIDING_WINDOW // BLOCK + 3, used
