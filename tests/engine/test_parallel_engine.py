"""Pipeline and data parallelism through the engine: same greedy tokens as one process."""

from __future__ import annotations

import pathlib
import re

import pytest

from shardline.engine import ConfigError, Engine, EngineConfig, EngineStats, SamplingParams
from support.generation import generate_all

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _prompts(n: int) -> list[str]:
    return [f"prompt {i}: " + "xy" * (i % 9) for i in range(n)]


async def _run(cfg: EngineConfig, prompts: list[str]) -> tuple[list[list[int]], list[EngineStats]]:
    async with await Engine.start(cfg) as engine:
        results = await generate_all(engine, prompts, GREEDY)
        per_core = engine.per_core_stats()
    return results, per_core


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = dict(model=str(path), max_model_len=128, num_kv_blocks=128, block_size=4)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


async def test_tensor_parallel_shards_of_gguf_weights_keep_the_same_tokens(
        tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF-quantized weights pack as integer blocks; TP=2 shards them (row-parallel layers
    along K, 32-aligned here), and each rank's shards still pack so: the same greedy tokens as
    one process, which the float32 panels give too."""
    from support.tiny_models import make_tiny_model_dir, quantize_checkpoint

    monkeypatch.setenv("SHARDLINE_LOG_LEVEL", "INFO")  # the workers' INFO lines below
    path = make_tiny_model_dir(tmp_path / "q", arch="LlamaForCausalLM")
    assert quantize_checkpoint(path) > 0
    prompts = _prompts(4)
    single, _ = await _run(_cfg(path, transport="inproc"), prompts)
    split, _ = await _run(_cfg(path, tensor_parallel_size=2), prompts)
    assert split == single
    logged = capfd.readouterr().err
    for rank in (0, 1):  # every layer of both ranks' shards, the LM head too
        assert re.search(rf"\[rank {rank}\] packed .* \(9 of 9 as integer blocks\)", logged), logged


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
async def test_pipeline_parallel_matches_single_process(tiny_llama_dir: pathlib.Path, tp: int, pp: int) -> None:
    prompts = _prompts(6)
    single, _ = await _run(_cfg(tiny_llama_dir, transport="inproc"), prompts)
    split, _ = await _run(_cfg(tiny_llama_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp), prompts)
    assert split == single
    assert all(len(t) == GREEDY.max_tokens for t in single)


async def test_data_parallel_serves_100_requests_on_both_cores(tiny_llama_dir: pathlib.Path) -> None:
    prompts = _prompts(100)
    single, _ = await _run(_cfg(tiny_llama_dir, num_kv_blocks=512), prompts)
    both, per_core = await _run(_cfg(tiny_llama_dir, num_kv_blocks=512, data_parallel_size=2), prompts)
    assert both == single
    assert len(per_core) == 2
    served = [sum(s.requests_finished.values()) for s in per_core]
    assert sum(served) == 100
    assert min(served) > 0, f"one core took no requests: {served}"


async def test_inconsistent_parallel_config_is_refused(tiny_llama_dir: pathlib.Path) -> None:
    # The tiny model has 4 heads, 2 KV heads and 2 layers.
    with pytest.raises(ConfigError, match="does not divide the model's 4 attention heads"):
        await Engine.start(_cfg(tiny_llama_dir, tensor_parallel_size=3))
    with pytest.raises(ConfigError, match="3 stages for a model of 2 layers"):
        await Engine.start(_cfg(tiny_llama_dir, pipeline_parallel_size=3))
    with pytest.raises(ConfigError, match="inproc"):
        EngineConfig(model=str(tiny_llama_dir), transport="inproc", tensor_parallel_size=2)


SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.2,
                         frequency_penalty=0.3, ignore_eos=True)


async def _sampled(cfg: EngineConfig, prompts: list[str]) -> tuple[list[list[int]], bool]:
    async with await Engine.start(cfg) as engine:
        results = await generate_all(engine, prompts, SAMPLED)
        overlapped = engine._cores[0].scheduler.config.async_scheduling
    return results, overlapped


async def test_tensor_parallel_ranks_keep_the_same_sampled_tokens(tiny_llama_dir: pathlib.Path) -> None:
    """TP=2 schedules asynchronously: every rank samples and keeps the tokens itself. Seeded
    random sampling with penalties gives what one process gives (a rank that kept a different
    token would embed it, and the all-reduce would carry that into every later step)."""
    prompts = _prompts(6)
    single, _ = await _sampled(_cfg(tiny_llama_dir, transport="inproc"), prompts)
    split, overlapped = await _sampled(_cfg(tiny_llama_dir, tensor_parallel_size=2), prompts)
    assert overlapped is True
    assert split == single
    assert all(len(t) == SAMPLED.max_tokens for t in single)
    assert len({tuple(t) for t in single}) > 1  # really sampled, not one repeated answer
    # Pipeline stages still schedule after each step (only the last stage sees logits).
    _, pp_overlapped = await _sampled(_cfg(tiny_llama_dir, pipeline_parallel_size=2), prompts[:2])
    assert pp_overlapped is False
