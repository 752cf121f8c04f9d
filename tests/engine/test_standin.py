"""The benchmark stand-in model loads through the registry plugin and generates its tokens."""

from __future__ import annotations

import pathlib

from engine import Engine, EngineConfig, SamplingParams
from model.standin import token_at, write_standin_model_dir
from support.tiny_models import make_tiny_model_dir


async def test_standin_model_loads_and_generates_its_deterministic_tokens(tmp_path: pathlib.Path) -> None:
    source = make_tiny_model_dir(tmp_path / "tiny")
    model_dir = write_standin_model_dir(tmp_path / "standin", source)
    config = EngineConfig(
        model=str(model_dir),
        plugins=("model.standin:register",),
        transport="inproc",
        num_kv_blocks=64,
        max_model_len=256,
        num_threads=1,
    )
    engine = await Engine.start(config)
    try:
        prompt = [40, 41, 42, 43, 44]
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outputs = [out async for out in engine.generate(prompt, params)]
    finally:
        await engine.aclose()
    width = 320  # the tiny model's vocabulary is narrower than the default logits width
    expected = [token_at(len(prompt) + i, width=width) for i in range(6)]
    assert outputs[-1].finished and outputs[-1].token_ids == expected
