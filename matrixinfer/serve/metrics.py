"""Prometheus metrics of one API server: request counters and latency histograms updated per
request; engine gauges and counters generated from :class:`EngineStats`' fields at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from matrixinfer.engine.outputs import EngineStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def _stat_fields() -> list[tuple[str, str, str, str]]:
    """``(field, metric name, help, kind)`` for every EngineStats field, from its metadata."""
    out = []
    for f in msgspec.inspect.type_info(EngineStats).fields:  # type: ignore[attr-defined]
        meta = f.type
        extra = getattr(meta, "extra", None) or {}
        doc = (getattr(meta, "extra_json_schema", None) or {}).get("description", f.name)
        out.append((f.name, extra.get("metric") or f.name, doc, extra.get("kind", "gauge")))
    return out


STAT_FIELDS = _stat_fields()

InstanceStats = tuple[str, str, EngineStats]  # (instance id, role, its last report)


class _EngineCollector:
    """The deployment's EngineStats (one engine, or the sum over a PDC deployment's instances)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for name, metric, doc, kind in STAT_FIELDS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"matrixinfer_{metric}", doc, value=getattr(s, name))
        yield GaugeMetricFamily("matrixinfer_kv_cache_usage_ratio", "Fraction of KV blocks in use", value=s.kv_usage)
        yield GaugeMetricFamily("matrixinfer_prefix_cache_hit_rate",
                                "Prompt tokens served from a prefix cache (local or EMS) / tokens looked up",
                                value=s.prefix_hit_rate)
        yield GaugeMetricFamily("matrixinfer_spec_decode_acceptance_rate",
                                "Speculative decoding: draft tokens accepted / proposed", value=s.spec_acceptance_rate)
        yield GaugeMetricFamily("matrixinfer_spec_decode_tokens_per_step",
                                "Speculative decoding: tokens per sequence per speculative step (accepted drafts + 1)",
                                value=s.spec_tokens_per_step)


class _InstanceCollector:
    """Per-instance gauges of a PDC deployment (``matrixinfer_instance_<field>``), labelled by
    instance and role."""

    def __init__(self, instances: Callable[[], list[InstanceStats]]) -> None:
        self.instances = instances

    def collect(self) -> Iterator[Metric]:
        instances = self.instances()
        if not instances:  # one colocated engine: nothing per instance
            return
        fams = {name: GaugeMetricFamily(f"matrixinfer_instance_{name}", doc, labels=["instance", "role"])
                for name, _, doc, _ in STAT_FIELDS}
        for iid, role, stats in instances:
            for name in fams:
                fams[name].add_metric([iid, role], float(getattr(stats, name)))
        yield from fams.values()


class ServerMetrics:
    """A private registry (several servers may live in one process in tests)."""

    def __init__(self, stats: Callable[[], EngineStats], instances: Callable[[], list[InstanceStats]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("matrixinfer_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.aborted = Counter("matrixinfer_requests_aborted", "Requests aborted because their client left",
                               registry=self.registry)
        self.errors = Counter("matrixinfer_request_errors", "Requests rejected with an error, by HTTP status",
                              ["status"], registry=self.registry)
        self.ttft = Histogram("matrixinfer_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("matrixinfer_inter_token_latency_seconds", "Time between consecutive output tokens",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("matrixinfer_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats))
        self.registry.register(_InstanceCollector(instances))
