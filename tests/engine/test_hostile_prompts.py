"""Prompts a client can send to stall the event loop (issue 20, item 4): a text that cannot
fit is refused from its length before it is tokenized, a long one is tokenized on a thread,
and the engine serves the next request."""

from __future__ import annotations

import pathlib
import threading

import pytest

from shardline import Engine, EngineConfig, PromptTooLongError, SamplingParams
from shardline.engine import api
from shardline.engine.model_info import ModelInfo


async def _tokens(engine: Engine, prompt: object) -> list[int]:
    return [t async for out in engine.generate(prompt, SamplingParams(max_tokens=3, temperature=0))  # type: ignore[arg-type]
            for t in out.delta_token_ids]


async def test_an_oversized_text_is_refused_before_tokenizing(tiny_llama_dir: pathlib.Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig(model=str(tiny_llama_dir), transport="inproc", max_model_len=64)
    async with await Engine.start(config) as engine:
        limit = 64 * engine._info.max_token_chars
        calls: list[str] = []
        real_encode, real_chat = ModelInfo.encode_prompt, ModelInfo.apply_chat_template
        monkeypatch.setattr(ModelInfo, "encode_prompt", lambda info, text: calls.append("text") or real_encode(info, text))
        monkeypatch.setattr(ModelInfo, "apply_chat_template", lambda info, m: calls.append("chat") or real_chat(info, m))
        with pytest.raises(PromptTooLongError, match=f"the prompt has {limit + 1} characters"):
            await _tokens(engine, "x" * (limit + 1))
        with pytest.raises(PromptTooLongError, match="characters"):
            async for _ in engine.chat([{"role": "user", "content": "y" * (limit + 1)}]):
                pass
        assert calls == []  # neither was tokenized
        assert len(await _tokens(engine, "hello")) == 3  # and the next one is served


async def test_a_long_text_is_tokenized_off_the_event_loop(tiny_llama_dir: pathlib.Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig(model=str(tiny_llama_dir), transport="inproc", max_model_len=2048)
    async with await Engine.start(config) as engine:
        threads: list[str] = []
        real = ModelInfo.encode_prompt

        def encode(info: ModelInfo, text: str) -> list[int]:
            threads.append(threading.current_thread().name)
            return real(info, text)[:8]  # a prefix: the point is where tokenizing ran

        monkeypatch.setattr(ModelInfo, "encode_prompt", encode)
        assert len(await _tokens(engine, "short prompt")) == 3
        assert len(await _tokens(engine, "z" * (api.TOKENIZE_OFF_LOOP_CHARS + 1))) == 3
        main = threading.current_thread().name
        assert threads[0] == main and threads[1] != main
