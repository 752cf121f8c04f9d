"""`GET /metrics` through prometheus_client, under vLLM V1's metric names (`vllm:` -> `shardline:`).

Each app has its own `CollectorRegistry` (several apps in one process never collide, nothing
goes to prometheus_client's global registry) holding:

* the process, platform and GC collectors (`process_*`, `python_*`), as vLLM's server has;
* `EngineCollector`, which reads the engine's statistics at scrape time, one series per data-
  parallel replica (`engine="0"`, ...): gauges, counters and the per-request histograms the
  engine core keeps (`engine.request_metrics`). The engine's counters are cumulative, so they
  are exported as prometheus_client metric families built at collect time (its documented way
  to mirror counts kept elsewhere), not as `Counter` objects that would have to be re-counted;
* `shardline:http_responses_total`, a `Counter` the HTTP layer increments itself.

docs/METRICS.md maps every name to vLLM's and lists what vLLM has that shardline does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from shardline.engine.request import FinishReason

PREFIX = "shardline:"

# Histogram name (without the prefix) -> help text; the engine core fills them
# (engine.request_metrics), names and buckets as vLLM's.
HISTOGRAMS: dict[str, str] = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "request_time_per_output_token_seconds": "Histogram of time_per_output_token_seconds per request.",
    "request_prompt_tokens": "Number of prefill tokens processed.",
    "request_generation_tokens": "Number of generation tokens processed.",
    "request_params_max_tokens": "Histogram of the max_tokens request parameter.",
    "iteration_tokens_total": "Histogram of number of tokens per engine_step.",
}

# Counter (EngineStats attribute, name without prefix and `_total`, help).
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("prompt_tokens", "prompt_tokens", "Number of prefill tokens processed."),
    ("generation_tokens", "generation_tokens", "Number of generation tokens processed."),
    ("num_preemptions", "num_preemptions", "Cumulative number of preemption from the engine."),
    (
        "prefix_cache_queries",
        "prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
    ),
    (
        "prefix_cache_hit_tokens",
        "prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
    ),
    (
        "num_restarts",
        "worker_restarts",
        "Times this replica's worker group failed and was restarted.",
    ),
)

# Gauge (EngineStats attribute, name without prefix, help).
GAUGES: tuple[tuple[str, str, str], ...] = (
    ("num_running", "num_requests_running", "Number of requests in model execution batches."),
    ("num_waiting", "num_requests_waiting", "Number of requests waiting to be processed."),
    ("kv_cache_usage", "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ("num_kv_blocks_used", "kv_cache_blocks_used", "KV-cache blocks in use."),
    ("num_kv_blocks_total", "kv_cache_blocks_total", "KV-cache blocks in the pool."),
)

LABELS = ("model_name", "engine")


def replica_stats(engine: Any) -> list[Any]:
    """One statistics snapshot per data-parallel replica (engine index order)."""
    per_core = getattr(engine, "per_core_stats", None)
    return list(per_core()) if callable(per_core) else [engine.stats()]


class EngineCollector(Collector):
    """The engine's statistics as Prometheus families, read at each scrape."""

    def __init__(self, engine_getter: Callable[[], Any], model_name: str) -> None:
        self.engine_getter = engine_getter
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        engine = self.engine_getter()
        replicas = replica_stats(engine)
        labels = [[self.model_name, str(index)] for index in range(len(replicas))]
        for attr, name, help_text in GAUGES:
            gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=LABELS)
            for values, stats in zip(labels, replicas, strict=True):
                gauge.add_metric(values, float(getattr(stats, attr)))
            yield gauge
        for attr, name, help_text in COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, help_text, labels=LABELS)
            for values, stats in zip(labels, replicas, strict=True):
                counter.add_metric(values, float(getattr(stats, attr)))
            yield counter
        success = CounterMetricFamily(
            PREFIX + "request_success",
            "Count of successfully processed requests.",
            labels=(*LABELS, "finished_reason"),
        )
        for values, stats in zip(labels, replicas, strict=True):
            finished: Mapping[str, int] = stats.requests_finished
            for reason in sorted({r.value for r in FinishReason} | set(finished)):
                success.add_metric([*values, reason], float(finished.get(reason, 0)))
        yield success
        yield from self._histograms(labels, replicas)
        yield from self._cache_config(engine, labels, replicas)
        yield from spec_decode_families(engine, labels, replicas)  # (H14's region below)

    def _histograms(self, labels: Sequence[list[str]], replicas: Sequence[Any]) -> Iterator[Metric]:
        for name, help_text in HISTOGRAMS.items():
            family: HistogramMetricFamily | None = None
            for values, stats in zip(labels, replicas, strict=True):
                counts = getattr(stats, "histograms", {}).get(name)
                if counts is None:  # an engine that does not measure it exports nothing
                    continue
                if family is None:
                    family = HistogramMetricFamily(PREFIX + name, help_text, labels=LABELS)
                buckets = [(_le(bound), float(n)) for bound, n in counts.cumulative()]
                family.add_metric(values, buckets, sum_value=counts.sum)
            if family is not None:
                yield family

    def _cache_config(
        self, engine: Any, labels: Sequence[list[str]], replicas: Sequence[Any]
    ) -> Iterable[Metric]:
        """vLLM's info-style gauge (always 1): the KV cache's settings as labels."""
        config = getattr(engine, "config", None)
        settings = {
            "block_size": getattr(config, "block_size", None),
            "cache_dtype": getattr(config, "kv_cache_dtype", None),
            "enable_prefix_caching": getattr(config, "enable_prefix_caching", None),
            "gpu_memory_utilization": getattr(config, "gpu_memory_utilization", None),
        }
        known = {key: str(value) for key, value in settings.items() if value is not None}
        info = GaugeMetricFamily(
            PREFIX + "cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=(*LABELS, *known, "num_gpu_blocks"),
        )
        for values, stats in zip(labels, replicas, strict=True):
            info.add_metric([*values, *known.values(), str(stats.num_kv_blocks_total)], 1.0)
        return [info]


# -- speculative decoding (H14; engine/speculative.py) ----------------------------------------

SPEC_DECODE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("spec_num_drafts", "spec_decode_num_drafts", "Number of spec decoding drafts."),
    ("spec_num_draft_tokens", "spec_decode_num_draft_tokens", "Number of draft tokens."),
    ("spec_num_accepted_tokens", "spec_decode_num_accepted_tokens", "Number of accepted tokens."),
)


def spec_decode_families(engine: Any, labels: Sequence[list[str]], replicas: Sequence[Any]) -> Iterator[Metric]:
    """vLLM's spec_decode counters, exported (as vLLM) only when speculative decoding is on:
    drafts, draft tokens, accepted tokens, and accepted tokens by draft position."""
    spec = getattr(getattr(engine, "config", None), "speculative", None)
    if spec is None:
        return
    for attr, name, help_text in SPEC_DECODE_COUNTERS:
        family = CounterMetricFamily(PREFIX + name, help_text, labels=LABELS)
        totals = [float(getattr(stats, attr, 0)) for stats in replicas]
        yield _filled(family, [(values, total) for values, total in zip(labels, totals, strict=True)])
    per_pos = CounterMetricFamily(
        PREFIX + "spec_decode_num_accepted_tokens_per_pos",
        "Accepted tokens per draft position.",
        labels=(*LABELS, "position"),
    )
    for values, stats in zip(labels, replicas, strict=True):
        accepted: Mapping[int, int] = getattr(stats, "spec_accepted_per_pos", {})
        for position in range(spec.num_speculative_tokens):
            per_pos.add_metric([*values, str(position)], float(accepted.get(position, 0)))
    yield per_pos


def _filled(family: CounterMetricFamily, samples: Sequence[tuple[list[str], float]]) -> CounterMetricFamily:
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class ServerMetrics:
    """One app's registry: process collectors, the engine's collector, the HTTP counter."""

    def __init__(self, engine_getter: Callable[[], Any], *, model_name: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(EngineCollector(engine_getter, model_name))
        self.http_responses = Counter(
            PREFIX + "http_responses",
            "API responses by path and status code.",
            ("path", "status"),
            registry=self.registry,
        )

    def count_response(self, path: str, status_code: int) -> None:
        """Count one answered request of an API endpoint."""
        self.http_responses.labels(path, str(status_code)).inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper's Accept header asks for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
