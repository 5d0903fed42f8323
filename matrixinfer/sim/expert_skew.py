"""The expert-load skew a default (static) expert placement leaves in prefill, from measured routing.

A default placement is planned once, on a history of expert loads (EPLB with redundant copies),
and then serves traffic whose expert popularity has drifted from that history. The busiest rank
over the mean rank load is the factor the simulator applies to a prefill step's expert compute and
all-to-all (``PrefillConfig.imbalance``).

The reference design publishes no per-expert load statistics for DeepSeek-R1, so the skew comes
from the demo model's own routing, recorded by ``benchmarks/eplb_demo.py`` on two disjoint halves
of held-out code (the snapshots shipped in ``matrixinfer/assets/expert-load/``): the history
half plans the placement, the other half is the traffic. The demo model has 16 experts per layer;
R1 has 256 over 32 dies with 8 routed + 1 redundant per die. Its loads are synthesised from the
measured ones: each of the 256 experts draws one measured (expert, layer) pair, keeping that
expert's share of the history and its drift (traffic share over history share) together. The
placement is planned on the synthetic history and judged on the synthetic traffic; the skew is the
mean over seeded draws. What this assumes: that R1's experts are as unequal, and drift as much,
as the demo model's do between two halves of the same kind of text.

Pure functions apart from :func:`load_snapshot` (reads a JSON file).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from matrixinfer.parallel.eplb import plan_placement

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "expert-load"
HISTORY = ASSETS / "demo-history.json"
TRAFFIC = ASSETS / "demo-code.json"


class SnapshotError(ValueError):
    """A load snapshot that cannot be used (names the file and what is wrong)."""


def load_snapshot(path: str | Path) -> list[list[float]]:
    """Per-layer per-expert token counts of a load snapshot (``matrixinfer ep-load``'s shape)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: cannot read a load snapshot: {exc}") from exc
    rows = data.get("expert_tokens") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise SnapshotError(f"{path}: expected 'expert_tokens': [[tokens per expert], ...] per MoE layer")
    if any(len(r) != len(rows[0]) for r in rows):
        raise SnapshotError(f"{path}: MoE layers list different numbers of experts")
    if any(not isinstance(x, (int, float)) or x < 0 for r in rows for x in r):
        raise SnapshotError(f"{path}: expert loads must be non-negative numbers")
    return [[float(x) for x in r] for r in rows]


def share_drift_pairs(history: list[list[float]], traffic: list[list[float]]) -> list[tuple[float, float]]:
    """``(share, drift)`` of every (layer, expert): its history load over the layer's mean, and its
    traffic share over its history share. Experts never routed to in the history are left out (no
    placement plans for them)."""
    if len(history) != len(traffic) or any(len(a) != len(b) for a, b in zip(history, traffic)):
        raise SnapshotError("history and traffic snapshots differ in layers or experts")
    pairs: list[tuple[float, float]] = []
    for h, t in zip(history, traffic):
        hs, ts = sum(h), sum(t)
        if hs <= 0 or ts <= 0:
            continue
        n = len(h)
        pairs.extend((x * n / hs, (y / ts) / (x / hs)) for x, y in zip(h, t) if x > 0)
    if not pairs:
        raise SnapshotError("no expert was routed to in both snapshots")
    return pairs


def placement_skew(history: list[float], traffic: list[float], ranks: int, redundant: int) -> float:
    """Busiest rank over the mean on ``traffic`` for the placement planned on ``history``."""
    plan = plan_placement(history, ranks, redundant)
    return plan.balance(traffic)


def synthetic_skew(pairs: list[tuple[float, float]], experts: int, ranks: int, redundant: int,
                   draws: int = 16, seed: int = 0) -> float:
    """Mean skew over ``draws`` synthetic layers of ``experts`` experts, each expert a measured
    ``(share, drift)`` pair drawn with replacement."""
    rng = random.Random(seed)
    total = 0.0
    for _ in range(draws):
        picked = [rng.choice(pairs) for _ in range(experts)]
        history = [s for s, _ in picked]
        traffic = [s * d for s, d in picked]
        total += placement_skew(history, traffic, ranks, redundant)
    return total / draws


@lru_cache(maxsize=8)
def measured_prefill_skew(experts: int = 256, ranks: int = 32, redundant: int = 32) -> float:
    """The default-balance prefill skew from the shipped snapshots (the reference design's prefill
    instance by default: 256 experts on 32 dies with one redundant copy each)."""
    pairs = share_drift_pairs(load_snapshot(HISTORY), load_snapshot(TRAFFIC))
    return synthetic_skew(pairs, experts, ranks, redundant)
