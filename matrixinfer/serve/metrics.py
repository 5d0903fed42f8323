"""Prometheus metrics of one API server: request counters and latency histograms updated per
request; engine gauges and counters generated from :class:`EngineStats`' fields at scrape time.
Every series carries a ``model_name`` label (the served model), as vLLM's do, so that dashboards and
alerts written for several deployments can tell them apart."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from matrixinfer.engine.outputs import EngineStats

log = logging.getLogger("matrixinfer.stats")
STATS_LOG_INTERVAL_S = 10.0  # how often the one-line engine summary is logged while there is work

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
COUNTER_FIELDS = [name for name, _, _, kind in STAT_FIELDS if kind == "counter"]

InstanceStats = tuple[str, str, EngineStats]  # (instance id, role, its last report)


class _EngineCollector:
    """The deployment's EngineStats (one engine, or the sum over a PDC deployment's instances)."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for name, metric, doc, kind in STAT_FIELDS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield self._one(family, f"matrixinfer_{metric}", doc, getattr(s, name))
        yield self._one(GaugeMetricFamily, "matrixinfer_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                        s.kv_usage)
        yield self._one(GaugeMetricFamily, "matrixinfer_prefix_cache_hit_rate",
                        "Prompt tokens served from a prefix cache (local or EMS) / tokens looked up",
                        s.prefix_hit_rate)
        yield self._one(GaugeMetricFamily, "matrixinfer_spec_decode_acceptance_rate",
                        "Speculative decoding: draft tokens accepted / proposed", s.spec_acceptance_rate)
        yield self._one(GaugeMetricFamily, "matrixinfer_spec_decode_tokens_per_step",
                        "Speculative decoding: tokens per sequence per speculative step (accepted drafts + 1)",
                        s.spec_tokens_per_step)

    def _one(self, family: type, name: str, doc: str, value: float) -> Metric:
        fam = family(name, doc, labels=["model_name"])
        fam.add_metric([self.model_name], value)
        return fam


class _InstanceCollector:
    """Per-instance gauges of a PDC deployment (``matrixinfer_instance_<field>``), labelled by
    instance and role."""

    def __init__(self, instances: Callable[[], list[InstanceStats]], model_name: str) -> None:
        self.instances = instances
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        instances = self.instances()
        if not instances:  # one colocated engine: nothing per instance
            return
        fams = {name: GaugeMetricFamily(f"matrixinfer_instance_{name}", doc, labels=["model_name", "instance", "role"])
                for name, _, doc, _ in STAT_FIELDS}
        for iid, role, stats in instances:
            for name in fams:
                fams[name].add_metric([self.model_name, iid, role], float(getattr(stats, name)))
        yield from fams.values()


class _Labelled:
    """A labelled counter with the ``model_name`` label already given: ``.labels(value)`` fills the other."""

    def __init__(self, counter: Counter, model_name: str) -> None:
        self.counter, self.model_name = counter, model_name

    def labels(self, value: str) -> Any:
        return self.counter.labels(self.model_name, value)


class ServerMetrics:
    """A private registry (several servers may live in one process in tests)."""

    def __init__(self, stats: Callable[[], EngineStats], instances: Callable[[], list[InstanceStats]],
                 model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        m = ["model_name"]
        self.requests = _Labelled(Counter("matrixinfer_requests", "Finished requests by finish reason",
                                          [*m, "finish_reason"], registry=self.registry), model_name)
        self.aborted = Counter("matrixinfer_requests_aborted", "Requests aborted because their client left",
                               m, registry=self.registry).labels(model_name)
        self.errors = _Labelled(Counter("matrixinfer_request_errors", "Requests rejected with an error, by HTTP status",
                                        [*m, "status"], registry=self.registry), model_name)
        self.ttft = Histogram("matrixinfer_time_to_first_token_seconds", "Time to first token", m,
                              buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("matrixinfer_inter_token_latency_seconds", "Time between consecutive output tokens", m,
                             buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("matrixinfer_e2e_request_latency_seconds", "Request latency, arrival to finish", m,
                             buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.registry.register(_EngineCollector(stats, model_name))
        self.registry.register(_InstanceCollector(instances, model_name))


def stats_line(prev: EngineStats, now: EngineStats, seconds: float) -> str | None:
    """vLLM-style one-line summary of the last ``seconds`` (None when the engine was idle throughout)."""
    prompt = now.prompt_tokens - prev.prompt_tokens
    gen = now.generation_tokens - prev.generation_tokens
    if not (prompt or gen or now.running or now.waiting):
        return None
    queried = now.prefix_queried_tokens - prev.prefix_queried_tokens
    hits = now.prefix_hit_tokens + now.external_hit_tokens - prev.prefix_hit_tokens - prev.external_hit_tokens
    hit = f"{100 * hits / queried:.1f}%" if queried else "-"
    return (f"prompt throughput {prompt / seconds:.1f} tok/s, generation throughput {gen / seconds:.1f} tok/s, "
            f"running {now.running}, waiting {now.waiting}, KV cache usage {100 * now.kv_usage:.1f}%, "
            f"prefix cache hit rate {hit}, preemptions {now.preemptions - prev.preemptions}")


async def log_stats_forever(stats: Callable[[], EngineStats], interval: float = STATS_LOG_INTERVAL_S) -> None:
    """Log :func:`stats_line` every ``interval`` seconds while the engine has work (cancel to stop)."""
    loop = asyncio.get_running_loop()
    prev, at = stats(), loop.time()
    while True:
        await asyncio.sleep(interval)
        now, t = stats(), loop.time()
        line = stats_line(prev, now, t - at)
        if line is not None:
            log.info("%s", line)
        prev, at = now, t
