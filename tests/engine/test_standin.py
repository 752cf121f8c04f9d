"""The benchmark stand-in model loads through the registry plugin and generates its tokens."""

from __future__ import annotations

import pathlib

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.model.standin import token_at, write_standin_model_dir
from support.tiny_models import make_tiny_model_dir


async def test_standin_model_loads_and_generates_its_deterministic_tokens(tmp_path: pathlib.Path) -> None:
    source = make_tiny_model_dir(tmp_path / "tiny")
    model_dir = write_standin_model_dir(tmp_path / "standin", source)
    config = EngineConfig(
        model=str(model_dir),
        plugins=("shardline.model.standin:register",),
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


async def test_latency_samples_stay_bounded_when_nobody_drains_them(tmp_path: pathlib.Path) -> None:
    """One inter-token sample per generated token: a server that never drains them (nothing
    does by default) must not grow without bound."""
    import anyio

    from shardline.engine.core import LATENCY_SAMPLES

    source = make_tiny_model_dir(tmp_path / "tiny")
    model_dir = write_standin_model_dir(tmp_path / "standin", source)
    config = EngineConfig(model=str(model_dir), plugins=("shardline.model.standin:register",), transport="inproc",
                          num_kv_blocks=512, max_model_len=256, num_threads=1)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    async with await Engine.start(config) as engine:

        async def one(i: int) -> None:
            async for _ in engine.generate([40 + i, 41, 42], params):
                pass

        async with anyio.create_task_group() as tg:
            for i in range(32):  # 6,400 tokens
                tg.start_soon(one, i)
        stats = engine.stats()
        assert stats.generation_tokens == 32 * 200
        assert len(stats.itl_seconds) == LATENCY_SAMPLES and len(stats.ttft_seconds) == 32
        assert len(engine.stats(drain_latencies=True).itl_seconds) == LATENCY_SAMPLES
        assert engine.stats().itl_seconds == []
