"""The stateless global scheduler's choice of instance (pure): least loaded wins.

There is no cache affinity: every prefill instance reaches the shared EMS pool, so any of them can
reuse any cached prefix. Load is the queued tokens (reported, plus what the router assigned since
the last report) and the KV-cache usage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLoad:
    """One instance as the router sees it."""

    instance_id: str
    queued_tokens: int
    kv_used: int
    kv_total: int
    assigned_tokens: int = 0  # tokens the router sent since the instance's last load report
    alive: bool = True


def load_score(x: InstanceLoad) -> float:
    """Lower is better: pending tokens dominate, KV usage breaks ties and steers away from full caches."""
    kv = x.kv_used / max(x.kv_total, 1)
    return (x.queued_tokens + x.assigned_tokens) + 1000.0 * kv


def pick_instance(instances: list[InstanceLoad], exclude: set[str] | None = None) -> str | None:
    """The least-loaded live instance not in ``exclude`` (ties: the first listed); None if none."""
    best = None
    for x in instances:
        if not x.alive or (exclude and x.instance_id in exclude):
            continue
        if best is None or load_score(x) < load_score(best):
            best = x
    return best.instance_id if best else None
