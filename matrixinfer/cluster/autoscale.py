"""The scaling policy: how many prefill or decode instances a pool should have (pure).

:func:`decide` is a function of the router's signals for one pool (:class:`PoolSignals`: instances,
queued requests, the window's mean TTFT for prefill or TPOT for decode), the spec's SLO, bounds and
thresholds (:class:`~matrixinfer.cluster.spec.Autoscale`) and the pool's :class:`ScaleState`. It
adds an instance when the queue per instance or the latency stays above its high mark for
``up_after`` consecutive decisions, removes one when both stay below their low marks for
``down_after`` decisions (hysteresis: the band between the marks holds), waits ``cooldown_s`` after
any change, and never leaves ``[min_instances, max_instances]``. Every decision carries its reason.
:class:`ScalingMetrics` exports the decisions for Prometheus.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from matrixinfer.cluster.spec import Autoscale, Pool

Action = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class PoolSignals:
    """What the router saw of one pool over the last interval."""

    instances: int  # instances joined and serving
    queued: int  # requests waiting in the pool's instances (not yet scheduled)
    latency_s: float | None  # mean TTFT (prefill) or TPOT (decode) of the window; None: no request finished


@dataclass(frozen=True)
class ScaleState:
    """The policy's memory between decisions for one pool."""

    up_votes: int = 0
    down_votes: int = 0
    last_change: float = -math.inf


@dataclass(frozen=True)
class Decision:
    role: str
    action: Action
    target: int  # instances the pool should have
    reason: str
    state: ScaleState


def _pressure(role: str, s: PoolSignals, slo_s: float, cfg: Autoscale) -> tuple[str, str]:
    """('up' | 'down' | 'hold', why)."""
    per = s.queued / max(1, s.instances)
    what = "TTFT" if role == "prefill" else "TPOT"
    lat = "no finished request" if s.latency_s is None else \
        f"{what} {s.latency_s * 1e3:.0f} ms = {s.latency_s / slo_s:.0%} of the SLO {slo_s * 1e3:.0f} ms"
    if per > cfg.queue_per_instance_high:
        return "up", f"queue {per:.1f}/instance > {cfg.queue_per_instance_high:g}; {lat}"
    if s.latency_s is not None and s.latency_s > cfg.latency_high * slo_s:
        return "up", f"{lat} > {cfg.latency_high:.0%}; queue {per:.1f}/instance"
    if per < cfg.queue_per_instance_low and (s.latency_s is None or s.latency_s < cfg.latency_low * slo_s):
        return "down", f"queue {per:.1f}/instance < {cfg.queue_per_instance_low:g}; {lat}"
    return "hold", f"within the band: queue {per:.1f}/instance; {lat}"


def decide(role: str, signals: PoolSignals, slo_s: float, pool: Pool, cfg: Autoscale, state: ScaleState,
           now: float) -> Decision:
    """The pool's target instance count and why (see the module docstring)."""
    n = signals.instances
    if n < pool.min_instances:
        return Decision(role, "up", pool.min_instances, f"{n} instances < min_instances {pool.min_instances}",
                        ScaleState(last_change=now))
    if n > pool.max_instances:
        return Decision(role, "down", pool.max_instances, f"{n} instances > max_instances {pool.max_instances}",
                        ScaleState(last_change=now))
    pressure, why = _pressure(role, signals, slo_s, cfg)
    state = ScaleState(state.up_votes + 1 if pressure == "up" else 0,
                       state.down_votes + 1 if pressure == "down" else 0, state.last_change)
    cooling = now - state.last_change < cfg.cooldown_s
    if pressure == "up" and state.up_votes >= cfg.up_after:
        if n >= pool.max_instances:
            return Decision(role, "hold", n, f"{why}; at max_instances {pool.max_instances}", state)
        if cooling:
            return Decision(role, "hold", n, f"{why}; cooling down", state)
        return Decision(role, "up", n + 1, why, ScaleState(last_change=now))
    if pressure == "down" and state.down_votes >= cfg.down_after:
        if n <= pool.min_instances:
            return Decision(role, "hold", n, f"{why}; at min_instances {pool.min_instances}", state)
        if cooling:
            return Decision(role, "hold", n, f"{why}; cooling down", state)
        return Decision(role, "down", n - 1, why, ScaleState(last_change=now))
    if pressure != "hold":
        votes = state.up_votes if pressure == "up" else state.down_votes
        need = cfg.up_after if pressure == "up" else cfg.down_after
        why = f"{why}; {pressure} {votes}/{need}"
    return Decision(role, "hold", n, why, state)


def windowed_mean(prev: tuple[float, float], now: tuple[float, float]) -> float | None:
    """Mean of a Prometheus histogram over a window from its (sum, count) at both ends."""
    count = now[1] - prev[1]
    return (now[0] - prev[0]) / count if count > 0 else None


class ScalingMetrics:
    """Prometheus series of the autoscaler: decisions by pool and action, each pool's target and
    current instances, and the last decision's reason (as a label of an info-style gauge)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.last: dict[str, Decision] = {}
        self.instances: dict[str, int] = {}

    def record(self, d: Decision, instances: int) -> None:
        self.counts[(d.role, d.action)] = self.counts.get((d.role, d.action), 0) + 1
        self.last[d.role] = d
        self.instances[d.role] = instances

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily("matrixinfer_autoscale_decisions", "Scaling decisions by pool and action",
                                        labels=["pool", "action"])
        for (role, action), n in sorted(self.counts.items()):
            decisions.add_metric([role, action], n)
        target = GaugeMetricFamily("matrixinfer_autoscale_target_instances", "Instances the autoscaler wants",
                                   labels=["pool"])
        current = GaugeMetricFamily("matrixinfer_autoscale_instances", "Instances serving at the last decision",
                                    labels=["pool"])
        reason = GaugeMetricFamily("matrixinfer_autoscale_last_decision", "1, labelled with the last decision",
                                   labels=["pool", "action", "reason"])
        for role, d in sorted(self.last.items()):
            target.add_metric([role], d.target)
            current.add_metric([role], self.instances[role])
            reason.add_metric([role, d.action, d.reason], 1.0)
        yield decisions
        yield target
        yield current
        yield reason
