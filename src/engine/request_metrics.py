"""Per-request and per-step histograms of one EngineCore, kept as cumulative bucket counts.

The engine core observes; `/metrics` (engine.server.metrics) exports them under vLLM's names
(`shardline:` for `vllm:`) with vLLM's bucket boundaries, and `EngineStats.histograms` hands
them to embedded users too. Counts only ever grow, so no reader drains anything and two readers
(a scrape and the stats logger) never steal each other's observations.

Timestamps (time.monotonic) follow vLLM V1's definitions:

* arrival: the request object is built (after tokenization), `Request.arrival_time`;
* queued: the core's loop takes it from its inbox; scheduled: its first step is built;
* first token / last token: the core publishes them.

time to first token = first token - arrival; e2e = finish - arrival; queue = scheduled - queued;
prefill = first token - scheduled; decode = last token - first token; inference = last token -
scheduled.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
"""vLLM's `time_to_first_token_seconds` boundaries."""
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
"""vLLM's `inter_token_latency_seconds` (and per-request time per output token) boundaries."""
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
"""vLLM's boundaries for e2e, queue, prefill, decode and inference times."""
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
"""vLLM's `iteration_tokens_total` boundaries (tokens per engine step)."""


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count boundaries)."""
    out: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


@dataclass
class HistogramCounts:
    """A histogram's buckets (`counts[i]`: observations in (bounds[i-1], bounds[i]]; the last
    slot: above every bound), their sum and count. Adding two merges replicas."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) pairs, +Inf last (Prometheus buckets)."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def copy(self) -> HistogramCounts:
        return HistogramCounts(self.bounds, list(self.counts), self.sum, self.count)

    def __add__(self, other: HistogramCounts) -> HistogramCounts:
        if self.bounds != other.bounds:
            raise ValueError("cannot add histograms with different buckets")
        counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        return HistogramCounts(self.bounds, counts, self.sum + other.sum, self.count + other.count)

    def __radd__(self, other: object) -> HistogramCounts:
        if other == 0:  # `merge` starts a missing key from 0
            return self.copy()
        return NotImplemented


# Names are the `shardline:` metric names without the prefix (vLLM's with `vllm:`).
TTFT = "time_to_first_token_seconds"
ITL = "inter_token_latency_seconds"
E2E = "e2e_request_latency_seconds"
QUEUE = "request_queue_time_seconds"
PREFILL = "request_prefill_time_seconds"
DECODE = "request_decode_time_seconds"
INFERENCE = "request_inference_time_seconds"
TPOT = "request_time_per_output_token_seconds"
PROMPT_TOKENS = "request_prompt_tokens"
GENERATION_TOKENS = "request_generation_tokens"
MAX_TOKENS = "request_params_max_tokens"
ITERATION_TOKENS = "iteration_tokens_total"


class RequestMetrics:
    """The histograms of one replica; the core calls the `on_*` methods from its loop."""

    def __init__(self, max_model_len: int) -> None:
        token_buckets = build_1_2_5_buckets(max_model_len)
        bounds: dict[str, Sequence[float]] = {
            TTFT: TTFT_BUCKETS, ITL: ITL_BUCKETS, TPOT: ITL_BUCKETS,
            E2E: REQUEST_LATENCY_BUCKETS, QUEUE: REQUEST_LATENCY_BUCKETS, PREFILL: REQUEST_LATENCY_BUCKETS,
            DECODE: REQUEST_LATENCY_BUCKETS, INFERENCE: REQUEST_LATENCY_BUCKETS,
            PROMPT_TOKENS: token_buckets, GENERATION_TOKENS: token_buckets, MAX_TOKENS: token_buckets,
            ITERATION_TOKENS: ITERATION_TOKENS_BUCKETS,
        }  # fmt: skip
        self.histograms = {name: HistogramCounts(tuple(b)) for name, b in bounds.items()}

    def on_step(self, num_tokens: int) -> None:
        """A step was sent to the workers with `num_tokens` scheduled tokens."""
        self.histograms[ITERATION_TOKENS].observe(num_tokens)

    def on_tokens(self, now: float, arrival: float, previous_token_at: float | None) -> None:
        """A request received new tokens at `now` (its first when `previous_token_at` is None)."""
        if previous_token_at is None:
            self.histograms[TTFT].observe(now - arrival)
        else:
            self.histograms[ITL].observe(now - previous_token_at)

    def on_finished(
        self,
        now: float,
        *,
        arrival: float,
        queued: float,
        scheduled: float | None,
        first_token: float | None,
        last_token: float | None,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        max_tokens: int | None,
    ) -> None:
        """A request finished (any reason). Phases it never reached are not observed."""
        h = self.histograms
        h[E2E].observe(now - arrival)
        h[PROMPT_TOKENS].observe(num_prompt_tokens)
        h[GENERATION_TOKENS].observe(num_generation_tokens)
        if max_tokens is not None:
            h[MAX_TOKENS].observe(max_tokens)
        if scheduled is None:
            return
        h[QUEUE].observe(scheduled - queued)
        if first_token is None or last_token is None:
            return
        h[PREFILL].observe(first_token - scheduled)
        h[DECODE].observe(last_token - first_token)
        h[INFERENCE].observe(last_token - scheduled)
        if num_generation_tokens > 1:
            h[TPOT].observe((last_token - first_token) / (num_generation_tokens - 1))

    def snapshot(self) -> dict[str, HistogramCounts]:
        return {name: h.copy() for name, h in self.histograms.items()}
