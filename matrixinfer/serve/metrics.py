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


class _InstanceCollector:
    """Per-instance gauges of a PDC deployment, labelled by instance and role."""

    def __init__(self, instances: Callable[[], list[tuple[str, str, object]]]) -> None:
        self.instances = instances

    def collect(self):
        fields = [
            ("queued_tokens", "Tokens waiting to be computed"), ("running", "Running sequences"),
            ("waiting", "Waiting sequences"), ("kv_used", "KV blocks in use"), ("kv_total", "KV blocks"),
            ("reserved_blocks", "KV blocks reserved for incoming transfers"),
            ("prompt_tokens", "Prompt tokens computed"), ("generation_tokens", "Tokens generated"),
            ("prefix_hit_tokens", "Tokens served from the local prefix cache"),
            ("external_hit_tokens", "Tokens loaded from the EMS context cache"),
            ("kv_sent_bytes", "KV bytes sent to decode instances"),
            ("kv_received_bytes", "KV bytes received from prefill instances"),
            ("kv_transfer_seconds", "Seconds spent sending KV"), ("kv_transfers", "KV transfers completed"),
            ("ems_stored_blocks", "KV blocks stored to the EMS context cache"),
            ("ems_loaded_blocks", "KV blocks loaded from the EMS context cache"),
        ]
        fams = {f: GaugeMetricFamily(f"matrixinfer_instance_{f}", doc, labels=["instance", "role"]) for f, doc in fields}
        for iid, role, load in self.instances():
            for f, _ in fields:
                fams[f].add_metric([iid, role], float(getattr(load, f)))
        yield from fams.values()


class ServerMetrics:
    """A private registry (several servers may live in one process in tests)."""

    def __init__(self, stats: Callable[[], object],
                 instances: Callable[[], list[tuple[str, str, object]]] | None = None) -> None:
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
        if instances is not None:
            self.registry.register(_InstanceCollector(instances))
