"""Prometheus metrics of one API server: request counters and latency histograms updated per
request, engine gauges read at scrape time."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], object]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("matrixinfer_requests_running", "Requests in the running batch", value=s.running)
        yield GaugeMetricFamily("matrixinfer_requests_waiting", "Requests waiting to be scheduled", value=s.waiting)
        yield GaugeMetricFamily("matrixinfer_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                                value=s.kv_blocks_used / max(s.kv_blocks_total, 1))
        yield GaugeMetricFamily("matrixinfer_kv_cache_blocks_total", "KV blocks in the cache", value=s.kv_blocks_total)
        yield GaugeMetricFamily("matrixinfer_kv_cache_blocks_used", "KV blocks in use", value=s.kv_blocks_used)
        yield CounterMetricFamily("matrixinfer_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=s.prefix_hit_tokens)
        yield CounterMetricFamily("matrixinfer_prefix_cache_queried_tokens",
                                  "Prompt tokens looked up in the prefix cache", value=s.prefix_queried_tokens)
        yield GaugeMetricFamily("matrixinfer_prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens",
                                value=s.prefix_hit_tokens / max(s.prefix_queried_tokens, 1))
        yield CounterMetricFamily("matrixinfer_prompt_tokens", "Prompt tokens computed", value=s.prompt_tokens)
        yield CounterMetricFamily("matrixinfer_generation_tokens", "Tokens generated", value=s.generation_tokens)
        yield CounterMetricFamily("matrixinfer_preemptions", "Sequences preempted for lack of KV blocks",
                                  value=s.preemptions)


class ServerMetrics:
    """A private registry (several servers may live in one process in tests)."""

    def __init__(self, stats: Callable[[], object]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("matrixinfer_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.errors = Counter("matrixinfer_request_errors", "Requests rejected with an error, by HTTP status",
                              ["status"], registry=self.registry)
        self.ttft = Histogram("matrixinfer_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("matrixinfer_inter_token_latency_seconds", "Time between consecutive output tokens",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("matrixinfer_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats))
