"""The part of a profile one scenario's simulation reads, as a grid to re-measure (pure; no timing).

Why: on a shared VM the machine's speed drifts by up to 2x over minutes (other tenants on the
shared cache and memory), so a profile taken minutes before a measured run can be off by more
than the 10% the validation is judged by, whatever the model does. ``simulate validate
--profile-each`` therefore re-measures, right before each scenario's measured run, the operator
points that scenario's simulation reads (Vidur's operator profiles, taken close in time to what
they are compared with). Which points those are is found by running the scenario's simulation
once on the base profile through :class:`RecordingCostModel`; :func:`focus_grid` turns them into a
:class:`~matrixinfer.sim.profiler.Grid` of the base profile's own measured values that bracket
every lookup; :func:`merge` puts the fresh tables over the base. Nothing is fitted to the
measured run: the fresh tables are operator measurements taken as ``matrixinfer profile`` takes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from matrixinfer.sim.local_cost import LocalCostModel
from matrixinfer.sim.local_ops import Dims
from matrixinfer.sim.profile_data import Cost, Profile
from matrixinfer.sim.profiler import GRIDS, Grid

# lookups -> the profiler's grid axis that measures them (operator name, index of the point's value)
AXIS_OF: dict[str, tuple[tuple[str, int], ...]] = {
    "batch": (("layer_decode", 0), ("layer_decode_dense", 0), ("mla_core_q1", 0), ("composition_decode", 0),
              ("lm_head", 0), ("sampling", 0)),
    "kv_len": (("layer_decode", 1), ("layer_decode_dense", 1), ("mla_core_q1", 1), ("composition_decode", 1)),
    "tokens": (("mla_prolog", 0), ("mla_epilogue", 0), ("rmsnorm", 0), ("dense_mlp", 0), ("routing", 0),
               ("shared_expert", 0)),
    "prefill": (("mla_core_prefill", 0), ("composition_prefill", 0)),
    "tokens_per_expert": (("experts", 0),),
    "host_batch": (("engine_host", 0), ("engine_cores", 0)),
    "api_prompt": (("api_request", 0), ("api_in", 0)),
    "api_load": (("api_request", 1), ("api_in", 1)),
    "api_streams": (("api_token", 0), ("api_gap", 0), ("serve_wait", 0), ("serve_cpu", 0), ("serve_gap", 0)),
    "idle_tokens": (("idle_wake", 0),),
    "kv_tokens": (("kv_transfer", 0),),
    "pd_prompt": (("pd_request", 0),),
    "api_idle": (("api_wake", 0),),
}
# where the base profile's measured values of each axis are (operator, axis index)
LADDER_OF = {"batch": ("step_decode", 0), "kv_len": ("step_decode", 1), "tokens": ("rmsnorm", 0),
             "prefill": ("step_prefill", 0), "tokens_per_expert": ("experts", 0), "host_batch": ("engine_host", 0),
             "api_prompt": ("api_request", 0), "api_streams": ("api_token", 0), "idle_tokens": ("idle_wake", 0),
             "idle_gaps": ("idle_wake", 1), "kv_tokens": ("kv_transfer", 0), "pd_prompt": ("pd_request", 0),
             "api_idle": ("api_wake", 0), "api_load": ("api_request", 1)}
FORWARD_AXES = ("tokens", "batch", "kv_len", "prefill", "tokens_per_expert")  # the profiler needs a point of each


class RecordingCostModel(LocalCostModel):
    """A :class:`LocalCostModel` that records every (operator, point) the simulation looks up."""

    def __init__(self, profile: Profile, dims: Dims, in_api_process: bool = True) -> None:
        self.seen: list[tuple[str, tuple[float, ...]]] = []
        super().__init__(profile, dims, in_api_process)
        self.seen.clear()  # the composition overhead's set-up looks up the profile's own points

    def op(self, name: str, *point: float) -> Cost:
        self.seen.append((name, tuple(point)))
        return super().op(name, *point)

    def idle_wake(self, tokens: int, idle_s: float) -> Cost | None:
        self.seen.append(("idle_wake", (float(tokens), idle_s)))
        return super().idle_wake(tokens, idle_s)

    def api_wake(self, idle_s: float) -> Cost | None:
        self.seen.append(("api_wake", (idle_s,)))
        return super().api_wake(idle_s)


def bracket(ladder: Sequence[float], values: Iterable[float]) -> tuple[int, ...]:
    """The ``ladder`` values from the largest at or below ``min(values)`` to the smallest at or above
    ``max(values)`` (the ends of the ladder where the values leave it); empty without values."""
    vals = list(values)
    steps = sorted(set(ladder))
    if not vals or not steps:
        return ()
    lo = max([v for v in steps if v <= min(vals)], default=steps[0])
    hi = min([v for v in steps if v >= max(vals)], default=steps[-1])
    return tuple(int(v) for v in steps if lo <= v <= hi)


def _ladder(base: Profile, axis: str, fallback: Grid) -> list[float]:
    op, i = LADDER_OF[axis]
    table = base.ops.get(op)
    if table is not None and table.points and i < len(table.axes):
        return table.values(i)
    return [float(v) for v in getattr(fallback, axis)]  # a profile taken before that operator (or axis) existed


def focus_grid(base: Profile, seen: Iterable[tuple[str, tuple[float, ...]]], dims: Dims,
               pd: bool) -> Grid:
    """The grid to re-measure for a scenario whose simulation on ``base`` looked up ``seen``: per
    axis, the base profile's values that bracket the lookups. Token operators are also measured at
    the step points (the composition overhead is a step minus its operators, point by point), and
    ``kv_transfer`` only for P/D. Timing settings (repeats, rounds) are those of the base's grid."""
    full = GRIDS["full"]
    timing = GRIDS.get(str(base.meta.get("grid")), full)
    values: dict[str, list[float]] = {axis: [] for axis in AXIS_OF}
    for name, point in seen:
        for axis, refs in AXIS_OF.items():
            for op, i in refs:
                if op == name and i < len(point):
                    values[axis].append(point[i])
    axes = {axis: bracket(_ladder(base, axis, full), vals) for axis, vals in values.items()}
    for axis in FORWARD_AXES:
        axes[axis] = axes[axis] or bracket(_ladder(base, axis, full), _ladder(base, axis, full)[:1])
    axes["tokens"] = bracket(_ladder(base, "tokens", full), [*axes["tokens"], *axes["batch"], *axes["prefill"]])
    per_expert = [t * dims.top_k / max(dims.n_experts, 1) for t in axes["prefill"]]
    axes["tokens_per_expert"] = bracket(_ladder(base, "tokens_per_expert", full),
                                        [*axes["tokens_per_expert"], *(max(v, 1.0) for v in per_expert)])
    idle_gaps = tuple(_ladder(base, "idle_gaps", full)) if axes["idle_tokens"] else ()
    # a request's idle gap is often longer than the longest profiled one: the whole ladder (floats)
    api_idle = tuple(_ladder(base, "api_idle", full)) if values["api_idle"] and axes["api_prompt"] else ()
    return replace(timing, name=f"focus-{timing.name}", tokens=axes["tokens"], batch=axes["batch"],
                   kv_len=axes["kv_len"], prefill=axes["prefill"], tokens_per_expert=axes["tokens_per_expert"],
                   host_batch=axes["host_batch"], api_prompt=axes["api_prompt"], api_streams=axes["api_streams"],
                   api_load=axes["api_load"] or (0,),
                   idle_tokens=axes["idle_tokens"], idle_gaps=idle_gaps, api_idle=api_idle,
                   kv_tokens=axes["kv_tokens"] if pd else (), pd_prompt=axes["pd_prompt"] if pd else (),
                   ems_block_kib=(), ems_concurrency=(), ep=(),
                   ep_tokens=())


def merge(base: Profile, fresh: Profile) -> Profile:
    """``base`` with every operator ``fresh`` measured (and the roofline) replaced by ``fresh``'s.

    Whole tables, not points: an interpolation between a point measured now and one measured
    minutes ago would mix two machine states again."""
    meta = {**fresh.meta, "base_date": base.meta.get("date"), "base_grid": base.meta.get("grid")}
    return Profile(meta, dict(fresh.roofline or base.roofline), {**base.ops, **fresh.ops})
