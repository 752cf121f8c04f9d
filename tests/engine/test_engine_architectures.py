"""The new architectures served end to end: greedy tokens through Engine.generate equal
transformers' `generate`; pipeline stages (PP=2) give PP=1's tokens for a dense and a MoE
model; data parallelism with expert parallelism (DP=2 x EP=2) gives them too; an expert split
the model cannot take is refused naming the numbers before any worker starts."""

from __future__ import annotations

import pathlib

import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.config import ConfigError
from support import hf_tiny
from support.generation import generate_all
from support.hf_tiny import ARCHITECTURES, make_hf_model_dir

PROMPTS = [[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33], [84, 104, 101, 32, 113]]
MAX_TOKENS = 12


def hf_greedy(path: pathlib.Path) -> list[list[int]]:
    """transformers' `generate` greedy continuation of each prompt, alone."""
    return hf_tiny.hf_greedy(path, PROMPTS, MAX_TOKENS)


def config(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(
        model=str(path), max_model_len=128, num_kv_blocks=64, block_size=4
    )
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


async def engine_tokens(path: pathlib.Path, **kw: object) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    async with await Engine.start(config(path, **kw)) as engine:
        return await generate_all(engine, PROMPTS, params)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
async def test_greedy_tokens_equal_transformers(arch: str, tmp_path: pathlib.Path) -> None:
    path = make_hf_model_dir(tmp_path / arch, arch, seed=4)
    assert await engine_tokens(path) == hf_greedy(path)


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
async def test_pipeline_stages_give_one_stage_tokens(arch: str, tmp_path: pathlib.Path) -> None:
    path = make_hf_model_dir(tmp_path / arch, arch, seed=6)
    assert await engine_tokens(path, pipeline_parallel_size=2) == hf_greedy(path)


@pytest.mark.slow
async def test_data_parallel_with_expert_parallel(tmp_path: pathlib.Path) -> None:
    path = make_hf_model_dir(tmp_path / "mixtral", "MixtralForCausalLM", seed=7)
    tokens = await engine_tokens(
        path, data_parallel_size=2, tensor_parallel_size=2, enable_expert_parallel=True
    )
    assert tokens == hf_greedy(path)


async def test_an_impossible_expert_split_is_refused_and_the_engine_then_starts(
    tmp_path: pathlib.Path,
) -> None:
    path = make_hf_model_dir(tmp_path / "qwen3moe", "Qwen3MoeForCausalLM", seed=8, num_experts=6)
    with pytest.raises(
        ConfigError, match=r"enable_expert_parallel.*num_experts=6 evenly \(6 % 4 = 2\)"
    ):
        await Engine.start(config(path, tensor_parallel_size=4, enable_expert_parallel=True))
    assert await engine_tokens(path) == hf_greedy(path)
