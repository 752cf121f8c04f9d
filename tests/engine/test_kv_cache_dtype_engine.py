"""`EngineConfig.kv_cache_dtype` (vLLM's --kv-cache-dtype) through the engine, tiny model."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest

from shardline.engine import Engine, EngineConfig, SamplingParams, cli
from shardline.engine.cli import main as cli_main
from shardline.engine.config import ConfigError
from support.generation import generate_all

PROMPTS = [
    "hello world",
    "the quick brown fox",
    "abc",
    "a longer prompt that spans a few blocks of tokens",
    "one more prompt, with punctuation!",
    "0123456789",
]
BUDGET = 1 << 20  # KV bytes per worker: the same for every dtype
BLOCK = 4


# the same KV bytes for every dtype; in-process worker, whose log the test reads
SETTINGS: dict[str, object] = {
    "max_model_len": 256,
    "block_size": BLOCK,
    "kv_cache_memory_bytes": BUDGET,
    "transport": "inproc",
}


def _cfg(path: pathlib.Path, **kw: object) -> EngineConfig:
    return EngineConfig(model=str(path), **{**SETTINGS, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("int8", ["'int8'", "auto, float16, bfloat16, fp8, fp8_e4m3, fp8_e5m2"]),
        ("fp8", ["'fp8'", "CUDA", "auto, float16, bfloat16"]),
        ("fp8_e5m2", ["'fp8_e5m2'", "CUDA", "auto, float16, bfloat16"]),
        ("Float16", ["'Float16'"]),
    ],
)
def test_bad_values_are_refused_naming_them(tiny_llama_dir, value, words, capsys):
    with pytest.raises(ConfigError) as info:
        _cfg(tiny_llama_dir, kv_cache_dtype=value)
    assert info.value.field == "kv_cache_dtype"
    for word in words:
        assert word in info.value.message
    # the command line: exit status 2 and one line naming the flag's field and the value
    assert (
        cli_main(["generate", "hi", "--model", str(tiny_llama_dir), "--kv-cache-dtype", value]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("shardline generate: error: kv_cache_dtype: ") and words[0] in err[-1]


def test_the_flag_reaches_the_config(tiny_llama_dir):
    for value in ("auto", "float16", "bfloat16"):
        args = cli._build_parser().parse_args(
            ["serve", "--model", str(tiny_llama_dir), "--kv-cache-dtype", value]
        )
        assert cli._engine_config(args).kv_cache_dtype == value
    args = cli._build_parser().parse_args(["serve", "--model", str(tiny_llama_dir)])
    assert cli._engine_config(args).kv_cache_dtype == "auto"  # the default


async def test_16bit_caches_hold_twice_the_blocks_and_keep_greedy_tokens(tiny_llama_dir, caplog):
    """The same kv_cache_memory_bytes holds twice the blocks in a float16/bfloat16 cache; the
    start-up log states the cache's dtype; greedy tokens agree with the float32 cache's (the
    tiny model's logits are close together, so a run may part after a near-tie: measured, every
    prompt equal over 24 tokens with either dtype). An engine started after a refused value serves."""
    caplog.set_level(logging.INFO)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    blocks: dict[str, int] = {}
    tokens: dict[str, list[list[int]]] = {}
    for dtype in ("auto", "float16", "bfloat16"):
        caplog.clear()
        async with await Engine.start(_cfg(tiny_llama_dir, kv_cache_dtype=dtype)) as engine:
            blocks[dtype] = engine.stats().num_kv_blocks_total
            tokens[dtype] = await generate_all(engine, PROMPTS, params)
        named = "float32" if dtype == "auto" else dtype
        assert any(f"MiB of {named}" in r.getMessage() for r in caplog.records), caplog.text
    assert blocks["float16"] == blocks["bfloat16"] == 2 * blocks["auto"]
    for dtype in ("float16", "bfloat16"):
        agree = 0
        for mine, base in zip(tokens[dtype], tokens["auto"], strict=True):
            agree += next(
                (i for i, (a, b) in enumerate(zip(mine, base, strict=True)) if a != b), len(base)
            )
        assert agree >= 0.75 * 24 * len(PROMPTS), (dtype, tokens[dtype], tokens["auto"])


async def test_worker_processes_take_the_dtype_and_tp2_equals_tp1(tiny_llama_dir):
    """Worker processes (shm transport) get the dtype through their WorkerConfig: TP=2, each
    rank holding its heads' float16 cache, gives TP=1's float16 tokens and the same block count."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results, blocks = [], []
    for tp in (1, 2):
        cfg = _cfg(
            tiny_llama_dir,
            kv_cache_dtype="float16",
            transport="shm",
            tensor_parallel_size=tp,
            kv_cache_memory_bytes=BUDGET // tp,
        )
        async with await Engine.start(cfg) as engine:
            blocks.append(engine.stats().num_kv_blocks_total)
            results.append(await generate_all(engine, PROMPTS, params))
    assert results[0] == results[1]
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    per_block = (
        config["num_hidden_layers"]
        * 2
        * BLOCK
        * config["num_key_value_heads"]
        * config["head_dim"]
        * 2
    )
    assert blocks == [BUDGET // per_block] * 2  # 2 bytes an element, in both worker layouts


async def test_a_bfloat16_model_on_cpu_serves_with_its_own_or_a_float16_cache(tiny_llama_dir):
    """dtype="bfloat16" on the CPU: the "auto" cache is bfloat16 too (gather + SDPA, the kernel
    takes float32 queries only), and a float16 cache is converted to bfloat16 as gathered."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = []
    for kv in ("auto", "float16"):
        async with await Engine.start(
            _cfg(tiny_llama_dir, dtype="bfloat16", kv_cache_dtype=kv)
        ) as engine:
            results.append(await generate_all(engine, PROMPTS, params))
    assert all(len(tokens) == 8 for run in results for tokens in run)
    assert sum(a[0] == b[0] for a, b in zip(*results, strict=True)) >= len(PROMPTS) // 2
