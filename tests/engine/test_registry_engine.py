"""A factory registered in the user's process is called in every spawned worker, with its ranks."""

from __future__ import annotations

import json
import pathlib

import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.model.registry import ModelRegistry
from support.factories import recording_llama_factory

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


async def _tokens(cfg: EngineConfig) -> list[int]:
    async with await Engine.start(cfg) as engine:
        async for out in engine.generate("registry", GREEDY):
            tokens = out.token_ids
    return tokens


async def test_registered_factory_runs_in_each_worker(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "factory.jsonl"
    monkeypatch.setenv("SHARDLINE_FACTORY_LOG", str(log))  # spawned workers inherit it
    ModelRegistry.register_model("RecordingLlama", recording_llama_factory)
    try:
        base = dict(model=str(tiny_llama_dir), max_model_len=64, num_kv_blocks=32, block_size=4)
        expected = await _tokens(EngineConfig(**base))  # type: ignore[arg-type]
        got = await _tokens(EngineConfig(**base, model_arch="RecordingLlama", tensor_parallel_size=2))  # type: ignore[arg-type]
    finally:
        ModelRegistry.unregister("RecordingLlama")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted((c["tp_rank"], c["tp_size"]) for c in calls) == [(0, 2), (1, 2)]
    assert len({c["pid"] for c in calls}) == 2
    assert got == expected
