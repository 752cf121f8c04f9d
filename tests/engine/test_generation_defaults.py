"""The model's generation_config.json: default sampling settings and every EOS id.

A tiny random model (in-process worker, no processes) whose generation_config.json lists two
EOS ids and its own sampling defaults: a request stops on either id, fields a request leaves
out take the model's values, an explicit value wins, and `EngineConfig.generation_config`
chooses the file ("auto", "vllm" (its EOS ids only), "none", or a folder).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams
from shardline.engine.config import ConfigError
from shardline.engine.model_info import generation_defaults, read_generation_config
from support.tiny_models import make_tiny_model_dir

PROMPT = "the quick brown fox"
ENDOFTEXT = 256  # the tiny tokenizer's EOS (config.json's eos_token_id)


def _cfg(path: pathlib.Path, **kw: Any) -> EngineConfig:
    base: dict[str, Any] = dict(
        model=str(path), transport="inproc", max_model_len=128, num_kv_blocks=64, block_size=4
    )
    base.update(kw)
    return EngineConfig(**base)


async def _run(engine: Engine, params: SamplingParams) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason = None
    async for out in engine.generate(PROMPT, params):
        tokens, reason = out.token_ids, out.finish_reason
    return tokens, reason


def _write_generation_config(folder: pathlib.Path, **values: Any) -> None:
    (folder / "generation_config.json").write_text(json.dumps(values))


@pytest.fixture(scope="module")
def model_and_greedy(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, list[int], int]:
    """A tiny model, its greedy continuation of PROMPT (ignoring EOS), and a second EOS id:
    a token the greedy run samples at some step k, not earlier and not the tokenizer's EOS."""
    import anyio

    path = make_tiny_model_dir(tmp_path_factory.mktemp("gen-config"), arch="LlamaForCausalLM")

    async def greedy() -> list[int]:
        async with await Engine.start(_cfg(path, generation_config="none")) as engine:
            tokens, _ = await _run(engine, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
            return tokens

    tokens = anyio.run(greedy)
    for k in range(2, len(tokens)):
        if tokens[k] not in tokens[:k] and tokens[k] != ENDOFTEXT and ENDOFTEXT not in tokens[:k]:
            return path, tokens, k
    pytest.fail(f"no usable second EOS id in the greedy run {tokens}")


async def test_second_eos_id_stops_and_model_temperature_applies(
    model_and_greedy: tuple[pathlib.Path, list[int], int],
) -> None:
    path, greedy, k = model_and_greedy
    second_eos = greedy[k]
    _write_generation_config(path, eos_token_id=[ENDOFTEXT, second_eos], temperature=0.0, repetition_penalty=1.0)
    async with await Engine.start(_cfg(path)) as engine:
        assert engine.eos_token_ids == {ENDOFTEXT, second_eos}
        assert engine.generation_defaults == {"temperature": 0.0, "repetition_penalty": 1.0}
        # No temperature given: the model's 0 (greedy), so the greedy tokens up to the second EOS.
        tokens, reason = await _run(engine, SamplingParams(max_tokens=24))
        assert tokens == greedy[: k + 1]
        assert reason == "stop"
        # ignore_eos ignores every EOS id.
        tokens, reason = await _run(engine, SamplingParams(max_tokens=20, ignore_eos=True))
        assert tokens == greedy[:20] and reason == "length"
        # An explicit temperature wins over the model's: sampling, not the greedy tokens.
        sampled = [
            (await _run(engine, SamplingParams(max_tokens=8, temperature=1.5, seed=seed, ignore_eos=True)))[0]
            for seed in range(3)
        ]
        assert any(tokens != greedy[:8] for tokens in sampled)


async def test_model_repetition_penalty_applies_unless_given(
    model_and_greedy: tuple[pathlib.Path, list[int], int],
) -> None:
    path, greedy, _ = model_and_greedy
    _write_generation_config(path, temperature=0.0, repetition_penalty=5.0)
    async with await Engine.start(_cfg(path)) as engine:
        left_out, _ = await _run(engine, SamplingParams(max_tokens=24, ignore_eos=True))
        given, _ = await _run(engine, SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=5.0))
        off, _ = await _run(engine, SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.0))
    assert left_out == given
    assert off == greedy
    assert left_out != greedy  # the penalty changes this model's greedy continuation


async def test_max_new_tokens_is_the_default_max_tokens(
    model_and_greedy: tuple[pathlib.Path, list[int], int],
) -> None:
    path, greedy, _ = model_and_greedy
    _write_generation_config(path, eos_token_id=ENDOFTEXT, temperature=0.0, max_new_tokens=5)
    async with await Engine.start(_cfg(path)) as engine:
        tokens, reason = await _run(engine, SamplingParams(ignore_eos=True))
        assert tokens == greedy[:5] and reason == "length"
        tokens, reason = await _run(engine, SamplingParams(max_tokens=7, ignore_eos=True))
        assert tokens == greedy[:7] and reason == "length"
    # A default larger than the context left is capped at it (an explicit one is refused).
    _write_generation_config(path, temperature=0.0, max_new_tokens=10_000)
    async with await Engine.start(_cfg(path, max_model_len=32)) as engine:
        num_prompt = len(engine.tokenizer.encode(PROMPT))
        tokens, reason = await _run(engine, SamplingParams(ignore_eos=True))
        assert len(tokens) == 32 - num_prompt and reason == "length"


async def test_generation_config_none_and_a_folder(
    model_and_greedy: tuple[pathlib.Path, list[int], int], tmp_path: pathlib.Path
) -> None:
    path, greedy, k = model_and_greedy
    second_eos = greedy[k]
    # The model's file would stop at the second EOS and give max_tokens 3: "none" ignores it,
    # "vllm" keeps its EOS ids but not its sampling defaults (as vLLM).
    _write_generation_config(path, eos_token_id=[ENDOFTEXT, second_eos], max_new_tokens=3)
    async with await Engine.start(_cfg(path, generation_config="none")) as engine:
        assert engine.eos_token_ids == {ENDOFTEXT}
        assert engine.generation_defaults == {}
        tokens, _ = await _run(engine, SamplingParams(max_tokens=k + 2, temperature=0.0))
        assert tokens[: k + 2] == greedy[: k + 2]
    async with await Engine.start(_cfg(path, generation_config="vllm")) as engine:
        assert engine.eos_token_ids == {ENDOFTEXT, second_eos}
        assert engine.generation_defaults == {}
        tokens, reason = await _run(engine, SamplingParams(max_tokens=k + 2, temperature=0.0))
        assert tokens == greedy[: k + 1] and reason == "stop"
    # A folder of its own wins over the model's file.
    folder = tmp_path / "override"
    folder.mkdir()
    _write_generation_config(folder, eos_token_id=second_eos, temperature=0.0)
    async with await Engine.start(_cfg(path, generation_config=str(folder))) as engine:
        assert engine.generation_defaults == {"temperature": 0.0}
        tokens, reason = await _run(engine, SamplingParams(max_tokens=24))
        assert tokens == greedy[: k + 1] and reason == "stop"


async def test_bad_generation_config_is_refused_at_start(
    model_and_greedy: tuple[pathlib.Path, list[int], int], tmp_path: pathlib.Path
) -> None:
    path = model_and_greedy[0]
    with pytest.raises(ConfigError, match="not 'auto'") as info:
        await Engine.start(_cfg(path, generation_config=str(tmp_path / "missing")))
    assert info.value.field == "generation_config"
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    _write_generation_config(copy, temperature=-1)
    with pytest.raises(ConfigError, match="temperature") as info:
        await Engine.start(_cfg(copy))
    assert info.value.field == "generation_config"
    with pytest.raises(ConfigError):
        EngineConfig(generation_config="")


def test_generation_defaults_mapping(tmp_path: pathlib.Path) -> None:
    values = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
              "max_new_tokens": 256, "do_sample": True, "eos_token_id": [1, 2], "bos_token_id": 0,
              "max_length": 4096}
    assert generation_defaults(values) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                                           "repetition_penalty": 1.1, "max_tokens": 256}
    assert generation_defaults({"temperature": None}) == {}
    _write_generation_config(tmp_path, **values)
    assert read_generation_config("auto", tmp_path) == (values, tmp_path / "generation_config.json")
    assert read_generation_config("none", tmp_path) == ({}, None)
    assert read_generation_config("auto", tmp_path / "no-such-model") == ({}, None)
    assert read_generation_config(str(tmp_path / "generation_config.json"), tmp_path)[0] == values


def test_fields_left_out_take_the_model_defaults() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                "max_tokens": 256}
    left_out = SamplingParams()
    assert left_out.temperature == 1.0 and left_out.max_tokens == 16  # built-in until submitted
    assert left_out.model_default_fields == set(defaults)
    resolved = left_out.with_model_defaults(defaults)
    assert {name: getattr(resolved, name) for name in defaults} == defaults
    explicit = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8, repetition_penalty=1.0)
    resolved = explicit.with_model_defaults(defaults)
    assert (resolved.temperature, resolved.top_p, resolved.max_tokens, resolved.repetition_penalty) == (0.0, 1.0, 8, 1.0)
    assert (resolved.top_k, resolved.min_p) == (20, 0.05)
    # None is "left out", as an HTTP body's missing field is.
    assert SamplingParams(temperature=None).with_model_defaults(defaults).temperature == 0.6
    # Built-in defaults when the model has none; a left-out max_tokens is capped by the context.
    assert SamplingParams().with_model_defaults({}) == SamplingParams()
    assert SamplingParams().with_model_defaults({}, max_tokens_cap=5).max_tokens == 5
    assert SamplingParams().with_model_defaults(defaults, max_tokens_cap=100).max_tokens == 100
    assert SamplingParams(max_tokens=200).with_model_defaults(defaults, max_tokens_cap=100).max_tokens == 200
