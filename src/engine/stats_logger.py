"""The periodic stats line, as vLLM logs it, from the engine (embedded users get it too).

    Engine 000: Avg prompt throughput: 512.0 tokens/s, Avg generation throughput: 88.4 tokens/s,
    Running: 3 reqs, Waiting: 0 reqs, GPU KV cache usage: 12.5%, Prefix cache hit rate: 40.0%

One line per data-parallel replica every `EngineConfig.log_stats_interval` seconds (10 by
default, 0 turns it off as vLLM's --disable-log-stats) on the `shardline.stats` logger at INFO,
while the replica is busy (tokens went through it during the interval, or it holds requests),
plus one last line for the interval in which it went idle; nothing while it stays idle. Like
vLLM, "Preemptions: N" joins the line when the interval had any. Throughputs are averages over
the interval; the prefix-cache hit rate is over every lookup since the engine started (cached
tokens / looked-up tokens). On a CPU engine the cache is "KV cache", not "GPU KV cache".
With speculative decoding, once drafts were verified, "Draft acceptance rate: R%" (accepted /
drafted tokens) and "Mean acceptance length: L" (1 + accepted tokens per verified draft, as
vLLM defines it) end the line, both since the engine started.

The task sleeps one interval between looks (no busy loop; idle, it wakes once per interval) and
lives in the engine's task group, so it stops with the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

logger = logging.getLogger("shardline.stats")


@dataclass
class _Previous:
    at: float
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    busy: bool = False


class StatsLogger:
    """Logs a line per replica (`read()` returns one EngineStats per replica) at each `tick`."""

    def __init__(
        self,
        read: Callable[[], Sequence[Any]],
        interval: float,
        *,
        gpu: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read = read
        self.interval = interval
        self.cache_name = "GPU KV cache" if gpu else "KV cache"
        self.clock = clock
        self._previous: list[_Previous] = []
        self.reset()

    def reset(self) -> None:
        """Start the first interval now (from the counters as they are)."""
        now = self.clock()
        self._previous = [
            _Previous(now, s.prompt_tokens, s.generation_tokens, s.num_preemptions)
            for s in self.read()
        ]

    def tick(self) -> None:
        """Close the interval: log each replica that was busy in it or has just gone idle."""
        now = self.clock()
        for index, stats in enumerate(self.read()):
            if index == len(self._previous):  # (replicas do not come and go; defensive)
                self._previous.append(_Previous(now, 0, 0, 0))
            prev = self._previous[index]
            elapsed = now - prev.at
            prompt = stats.prompt_tokens - prev.prompt_tokens
            generation = stats.generation_tokens - prev.generation_tokens
            preemptions = stats.num_preemptions - prev.num_preemptions
            busy = bool(prompt or generation or stats.num_running or stats.num_waiting)
            if busy or prev.busy:
                self._log(
                    index,
                    stats,
                    prompt / elapsed if elapsed > 0 else 0.0,
                    generation / elapsed if elapsed > 0 else 0.0,
                    preemptions,
                )
            self._previous[index] = _Previous(
                now, stats.prompt_tokens, stats.generation_tokens, stats.num_preemptions, busy
            )

    def _log(
        self, index: int, stats: Any, prompt_tps: float, generation_tps: float, preemptions: int
    ) -> None:
        parts = [
            "Engine %03d: Avg prompt throughput: %.1f tokens/s",
            "Avg generation throughput: %.1f tokens/s",
            "Running: %d reqs",
            "Waiting: %d reqs",
        ]
        args: list[Any] = [index, prompt_tps, generation_tps, stats.num_running, stats.num_waiting]
        if preemptions:
            parts.append("Preemptions: %d")
            args.append(preemptions)
        queries = stats.prefix_cache_queries
        hit_rate = stats.prefix_cache_hit_tokens / queries if queries else 0.0
        parts += [f"{self.cache_name} usage: %.1f%%", "Prefix cache hit rate: %.1f%%"]
        args += [stats.kv_cache_usage * 100, hit_rate * 100]
        draft_tokens = getattr(stats, "spec_num_draft_tokens", 0)
        if draft_tokens:  # speculative decoding, since the engine started (as vLLM's names)
            accepted = stats.spec_num_accepted_tokens
            parts += ["Draft acceptance rate: %.1f%%", "Mean acceptance length: %.2f"]
            args += [accepted / draft_tokens * 100, 1 + accepted / max(stats.spec_num_drafts, 1)]
        logger.info(", ".join(parts), *args)

    async def run(self) -> None:
        """Tick every interval until cancelled; a failure to read is logged, never raised (it
        would stop the engine)."""
        self.reset()
        while True:
            await anyio.sleep(self.interval)
            try:
                self.tick()
            except Exception:
                logger.exception("stats line failed; trying again in %s s", self.interval)
