"""`GET /metrics`: the Prometheus text exposition format (version 0.0.4), written by hand.

Counters and gauges the engine already keeps are read from `engine.stats()` at scrape time;
latencies only the server sees (time to first token, inter-token latency, end-to-end) are
histograms kept here. Writing the ~100 lines of format avoids a runtime dependency.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "shardline_"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: `le` buckets plus +Inf)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help_text = help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """Record `value` (seconds) `times` times."""
        if times <= 0 or math.isnan(value):
            return
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_num(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """What the HTTP layer measures itself, plus rendering of the engine's statistics."""

    def __init__(self) -> None:
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from receiving a request to its first generated token.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            ITL_BUCKETS,
        )
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from receiving a request to its last token.",
            E2E_BUCKETS,
        )
        self.http_responses: Counter[tuple[str, int]] = Counter()

    def count_response(self, path: str, status_code: int) -> None:
        """Count one answered request of an API endpoint."""
        self.http_responses[(path, status_code)] += 1

    def render(self, stats: Any, *, model_name: str) -> str:
        """The whole exposition: engine statistics (`EngineStats`) and the server's own."""
        out: list[str] = []
        model = {"model_name": model_name}
        finished: Mapping[str, int] = getattr(stats, "requests_finished", {}) or {}
        out += _family(
            PREFIX + "requests_total", "counter", "Finished requests by finish reason.",
            [({**model, "finish_reason": reason}, n) for reason, n in sorted(finished.items())],
        )
        for name, attr, kind, help_text in (
            ("prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens processed."),
            ("generation_tokens_total", "generation_tokens", "counter", "Tokens generated."),
            ("prefix_cache_hit_tokens_total", "prefix_cache_hit_tokens", "counter",
             "Prompt tokens whose KV came from the prefix cache."),
            ("num_preemptions_total", "num_preemptions", "counter", "Requests preempted (recompute)."),
            ("num_requests_running", "num_running", "gauge", "Requests in the running batch."),
            ("num_requests_waiting", "num_waiting", "gauge", "Requests waiting to be scheduled."),
            ("kv_cache_blocks_used", "num_kv_blocks_used", "gauge", "KV-cache blocks in use."),
            ("kv_cache_blocks_total", "num_kv_blocks_total", "gauge", "KV-cache blocks in the pool."),
        ):
            out += _family(PREFIX + name, kind, help_text, [(model, getattr(stats, attr, 0))])
        used = getattr(stats, "num_kv_blocks_used", 0)
        total = getattr(stats, "num_kv_blocks_total", 0)
        out += _family(
            PREFIX + "kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use (0..1).",
            [(model, used / total if total else 0.0)],
        )
        out += self.time_to_first_token.render()
        out += self.inter_token_latency.render()
        out += self.e2e_latency.render()
        out += _family(
            PREFIX + "http_responses_total", "counter", "API responses by path and status code.",
            [({"path": path, "status": str(code)}, n)
             for (path, code), n in sorted(self.http_responses.items())],
        )
        return "\n".join(out) + "\n"


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lines.append(f"{name}{_labels(labels)} {_num(value)}")
    return lines


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
