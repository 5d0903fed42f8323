"""Autoscaling what-if: a day's load curve -> instances per pool per hour (MatrixCompute's role)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from matrixinfer.sim.planner import Plan, PlanRequest


@dataclass(frozen=True)
class HourPlan:
    hour: int
    load_rps: float
    prefill_instances: int
    decode_instances: int
    chips: int
    served_rps: float


def diurnal_curve(peak_rps: float, trough_fraction: float = 0.3) -> list[float]:
    """A simple day: trough at 04:00, peak at 16:00 (cosine), in requests/s per hour."""
    lo = peak_rps * trough_fraction
    return [lo + (peak_rps - lo) * 0.5 * (1 - math.cos(2 * math.pi * (h - 4) / 24)) for h in range(24)]


def autoscale(plan: Plan, req: PlanRequest, load_rps: list[float], total_chips: int,
              headroom: float = 0.1) -> list[HourPlan]:
    """Instances of each pool per hour so capacity covers load x (1 + headroom), within chips."""
    p_rps = plan.prefill.tok_s_per_chip * plan.prefill.chips / req.prompt
    d_rps = plan.decode.tok_s_per_chip * plan.decode.chips / req.output
    out = []
    for hour, load in enumerate(load_rps):
        need = load * (1 + headroom)
        n_p = max(1, math.ceil(need / p_rps))
        n_d = max(1, math.ceil(need / d_rps))
        while n_p * plan.prefill.chips + n_d * plan.decode.chips > total_chips and (n_p > 1 or n_d > 1):
            # shrink the pool with more spare capacity first
            if n_p > 1 and (n_p - 1) * p_rps / max(need, 1e-9) >= (n_d - 1) * d_rps / max(need, 1e-9):
                n_p -= 1
            elif n_d > 1:
                n_d -= 1
            else:
                n_p -= 1
        chips = n_p * plan.prefill.chips + n_d * plan.decode.chips
        out.append(HourPlan(hour, load, n_p, n_d, chips, min(load, n_p * p_rps, n_d * d_rps)))
    return out
