"""Optional per-phase timers for the EngineCore loop (a benchmark aid, off by default).

With ``SHARDLINE_STEP_TIMING_FILE=/path/prefix`` in the environment, each EngineCore adds the
wall time of every phase of its loop into totals and writes them as JSON to
``<prefix>.<core name>`` when it stops; the worker's runner does the same for its side
(``worker.model_runner``). Off, every call is a no-op on a disabled timer (one attribute test).

Phases are charged in this thread's CPU time (`time.thread_time`), not wall time: on a shared
machine a phase's wall time also counts the moments the OS ran someone else. The executor's
await is split the same way: CPU spent on the event loop while the step is in flight (encoding
and sending the step, waking consumers, the executor's reader) versus wall time the loop sat
idle waiting for the worker's answer.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Any

ENV_VAR = "SHARDLINE_STEP_TIMING_FILE"


class StepTimer:
    """Accumulates `lap(name)` durations; disabled unless built with a path."""

    def __init__(self, path: str | None) -> None:
        self.enabled = path is not None
        self.path = path
        self.totals: defaultdict[str, float] = defaultdict(float)
        self.steps = 0
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()

    @classmethod
    def from_env(cls, name: str) -> StepTimer:
        prefix = os.environ.get(ENV_VAR)
        return cls(f"{prefix}.{name}" if prefix else None)

    def lap(self, name: str) -> None:
        """Charge the CPU time since the previous lap to `name`."""
        if not self.enabled:
            return
        cpu = time.thread_time()
        self.totals[name] += cpu - self._last_cpu
        self._last = time.perf_counter()
        self._last_cpu = cpu

    def lap_execute(self) -> None:
        """Charge an executor await: loop CPU (encode, send, consumers, reader) vs idle."""
        if not self.enabled:
            return
        now, cpu = time.perf_counter(), time.thread_time()
        busy = cpu - self._last_cpu
        self.totals["execute: event-loop CPU (encode+send, consumer wake-ups, reader)"] += busy
        self.totals["execute: loop idle (worker + transport)"] += max(0.0, now - self._last - busy)
        self._last, self._last_cpu = now, cpu

    def measure_encode(self, message: Any) -> None:
        """Time encoding `message` once more on the side (the real encode is in the channels)."""
        from shardline.transport.messages import encode

        start = time.thread_time()
        encode(message)
        self.totals["(side) encode ExecuteStep"] += time.thread_time() - start
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()

    def step_done(self) -> None:
        if self.enabled:
            self.steps += 1

    def dump(self) -> None:
        """Write the totals (and the step count) as JSON to the path, if enabled."""
        if not self.enabled or self.path is None:
            return
        data: dict[str, Any] = dict(self.totals)
        data["_steps"] = self.steps
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
