"""The periodic stats line: vLLM's wording and numbers while busy, one last line, then silence."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import re

import pytest

from shardline.engine import ConfigError, Engine, EngineConfig, EngineStats, SamplingParams
from shardline.engine.stats_logger import StatsLogger
from support.waiting import wait_until

LOGGER = "shardline.stats"
LINE = re.compile(
    r"Engine (\d{3}): Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
    r"Running: (\d+) reqs, Waiting: (\d+) reqs, (?:Preemptions: \d+, )?KV cache usage: ([\d.]+)%, "
    r"Prefix cache hit rate: ([\d.]+)%"
)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_lines_carry_the_intervals_numbers_and_stop_once_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = _Clock()
    replicas = [EngineStats(num_kv_blocks_total=8), EngineStats(num_kv_blocks_total=8)]
    log = StatsLogger(lambda: replicas, 10.0, clock=clock)
    log.tick()
    assert _lines(caplog) == []  # idle from the start: nothing

    clock.now += 10.0
    replicas[0] = EngineStats(num_running=2, num_waiting=1, num_kv_blocks_total=8, num_kv_blocks_used=2,
                              prompt_tokens=100, generation_tokens=40, prefix_cache_queries=100,
                              prefix_cache_hit_tokens=25, num_preemptions=1)  # fmt: skip
    log.tick()
    assert _lines(caplog) == [
        "Engine 000: Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 4.0 tokens/s, "
        "Running: 2 reqs, Waiting: 1 reqs, Preemptions: 1, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%"
    ]  # replica 1 stayed idle: no line for it

    caplog.clear()
    clock.now += 5.0
    replicas[0] = EngineStats(num_kv_blocks_total=8, prompt_tokens=100, generation_tokens=60,
                              prefix_cache_queries=100, prefix_cache_hit_tokens=25, num_preemptions=1)  # fmt: skip
    log.tick()  # the requests finished during this interval: still counted, Running 0
    assert _lines(caplog) == [
        "Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 4.0 tokens/s, "
        "Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%, Prefix cache hit rate: 25.0%"
    ]
    caplog.clear()
    clock.now += 10.0
    log.tick()  # the first idle interval: one last line
    assert _lines(caplog) == [
        "Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0 tokens/s, "
        "Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%, Prefix cache hit rate: 25.0%"
    ]
    caplog.clear()
    for _ in range(3):
        clock.now += 10.0
        log.tick()
    assert _lines(caplog) == []


def test_a_waiting_request_keeps_the_line_going_and_gpu_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = _Clock()
    stats = EngineStats(num_waiting=3, num_kv_blocks_total=4, num_kv_blocks_used=4)
    log = StatsLogger(lambda: [stats], 10.0, gpu=True, clock=clock)
    clock.now += 10.0
    log.tick()
    assert _lines(caplog) == [
        "Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0 tokens/s, "
        "Running: 0 reqs, Waiting: 3 reqs, GPU KV cache usage: 100.0%, Prefix cache hit rate: 0.0%"
    ]


def test_the_interval_is_validated(tiny_llama_dir: pathlib.Path) -> None:
    for bad in (-1, "10"):
        with pytest.raises(ConfigError, match="log_stats_interval"):
            EngineConfig(model=str(tiny_llama_dir), log_stats_interval=bad)  # type: ignore[arg-type]


def _config(path: pathlib.Path, interval: float) -> EngineConfig:
    return EngineConfig(model=str(path), max_model_len=256, num_kv_blocks=128, block_size=4, transport="inproc",
                        log_stats_interval=interval)  # fmt: skip


async def test_a_real_engine_logs_while_busy_then_once_idle(
    tiny_llama_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    interval = 0.05
    engine = await Engine.start(_config(tiny_llama_dir, interval))
    try:

        async def request() -> int:
            params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            last = None
            async for out in engine.generate("count the tokens of this prompt", params):
                last = out
            assert last is not None
            return last.num_output_tokens

        task = asyncio.create_task(request())
        # A line while the request runs (200 tokens outlast several 50 ms intervals).
        await wait_until(
            lambda: any("Running: 1 reqs" in line for line in _lines(caplog)) or task.done(), 60
        )
        assert await task == 200
        busy = [LINE.fullmatch(line) for line in _lines(caplog)]
        assert all(busy), _lines(caplog)
        # Then the last line: nothing left running, nothing generated in its interval.
        await wait_until(lambda: any(m and m[3] == "0.0" and m[4] == "0"
                                     for m in map(LINE.fullmatch, _lines(caplog))), 30)  # fmt: skip
        lines = _lines(caplog)
        running = [LINE.fullmatch(line) for line in lines if "Running: 1 reqs" in line]
        assert running, lines
        for match in running:
            assert float(match[3]) > 0 or float(match[2]) > 0  # tokens went through
            assert float(match[6]) > 0  # the request holds KV blocks
        # Idle now: no more lines, however many intervals pass (generous: 20 of them).
        await asyncio.sleep(20 * interval)
        assert _lines(caplog) == lines
    finally:
        await engine.aclose()
    # The logger stopped with the engine: no task of it (or any other) is left.
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert leftover == [], leftover


async def test_zero_turns_the_line_off(
    tiny_llama_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with await Engine.start(_config(tiny_llama_dir, 0)) as engine:
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "shardline-stats-logger"]
        async for _ in engine.generate("hello", SamplingParams(max_tokens=5, ignore_eos=True)):
            pass
    assert _lines(caplog) == []
