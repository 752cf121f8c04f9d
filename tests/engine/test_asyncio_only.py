"""The engine runs on asyncio: under anyio's trio backend `Engine.start` says so, at once."""

from __future__ import annotations

import pathlib

import anyio
import pytest

import shardline.engine.api
from shardline.engine import Engine, EngineConfig


def test_engine_start_under_trio_says_it_needs_asyncio(
    tiny_llama_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("trio")

    def must_not_load(*args: object) -> None:
        raise AssertionError("Engine.start began loading the model under trio")

    monkeypatch.setattr(shardline.engine.api, "locate_model", must_not_load)

    async def main() -> None:
        await Engine.start(EngineConfig(model=str(tiny_llama_dir), transport="inproc"))

    with pytest.raises(RuntimeError, match="runs on asyncio") as info:
        anyio.run(main, backend="trio")
    assert "trio" in str(info.value)
    assert "backend='asyncio'" in str(info.value)
