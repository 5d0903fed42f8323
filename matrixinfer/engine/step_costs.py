"""What a decode step costs with 0, 1, ..., K drafts: the start-up measurement, and what the engine
measures while it serves.

The start-up measurement (:meth:`matrixinfer.engine.speculative.MTPSpeculator.measure_costs`)
times a few dozen synthetic steps per batch size, once. On cores other processes share, its
ratios move by tens of percent from one start to the next (the demo model at batch 1, in runs of
the same benchmark minutes apart: two drafts at 1.6x to 2.2x a plain step), and a policy that
decides from one such draw for the engine's whole life decides on noise. It is kept as the prior
and as the shape of cost over batch size; :class:`LearnedCosts` corrects it per batch bucket and
draft depth from the engine's measured steps. Pure and torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIOR_STEPS = 1.0  # how many measured steps a depth's start-up figure is worth
ALPHA = 0.1  # weight of a new step in its depth's factor once that rests on 1 / ALPHA steps (the last few dozen)
LOAD_ALPHA = 0.3  # weight of a new step in the load factor (the last few steps, any depth)
CLIP = 3.0  # a step is taken as at most this factor from the estimate (a preempted step is not the cost)
CLIP_AFTER = 3  # ... once the bucket's estimate rests on this many measured steps


@dataclass(frozen=True)
class StepCosts:
    """Seconds per decode step, measured at batch sizes ``batches`` (ascending): ``plain`` without
    speculation, ``spec[k - 1]`` with ``k`` drafts per sequence. ``complete`` says the measurement
    stopped because speculation could no longer pay at any acceptance at its last batch size (so
    that batch and larger ones never speculate: asking the policy there only costs its exploration,
    each explored step at batch 64 of the demo model 2-3x a plain one); otherwise it stopped for
    lack of KV blocks and larger batches extrapolate the last two points."""

    batches: tuple[int, ...]
    plain: tuple[float, ...]
    spec: tuple[tuple[float, ...], ...]
    complete: bool = False

    def __post_init__(self) -> None:
        n = len(self.batches)
        if not n or len(self.plain) != n or not self.spec or any(len(s) != n for s in self.spec):
            raise ValueError("step costs need a plain and a speculative time per draft count per measured batch size")
        if list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ValueError(f"measured batch sizes must be positive and ascending, got {self.batches}")
        if min(self.plain) <= 0 or min(min(s) for s in self.spec) <= 0:
            raise ValueError(f"step costs must be positive seconds, got plain {self.plain}, spec {self.spec}")

    @property
    def limit(self) -> int | None:
        """The largest batch that may speculate (None: any)."""
        return self.batches[-1] - 1 if self.complete else None

    def at(self, batch: int) -> tuple[float, list[float]] | None:
        """``(t_plain, [t_1, ..., t_K])`` at ``batch`` (linear between measured sizes), or None past a
        complete measurement."""
        if batch >= self.batches[-1] and self.complete:
            return None
        return self._interp(self.plain, batch), [self._interp(s, batch) for s in self.spec]

    def _interp(self, ys: tuple[float, ...], batch: int) -> float:
        bs = self.batches
        if batch <= bs[0] or len(bs) == 1:
            return ys[0]
        i = next((j for j in range(1, len(bs)) if bs[j] >= batch), len(bs) - 1)
        w = (batch - bs[i - 1]) / (bs[i] - bs[i - 1])
        return max(ys[i - 1] + w * (ys[i] - ys[i - 1]), ys[i - 1] * 1e-3)  # (never <= 0 past the last point)


def bucket(batch: int) -> int:
    """The batch-size bucket a measured step counts for: 1, 2-3, 4-7, 8-15, ... (the start-up
    figures interpolated over batch size give the shape inside a bucket)."""
    return batch.bit_length()


class LearnedCosts:
    """Step costs as the engine measures them: per batch bucket, the start-up figure at the step's
    batch for each draft depth (0: a plain step) times a learned *load* factor shared by the depths
    and a learned *relative* factor per depth.

    Steps at the depth in use are timed every step, the others only when the policy explores them,
    at other moments; on cores other processes share, a depth measured in a busy minute would look
    dearer than one measured in a quiet one (the demo model's per-step times swing 2x within a
    benchmark run). So each step's ``log(measured / start-up)`` first moves the load (by
    :data:`LOAD_ALPHA` of its residual: it follows the last few steps, whatever their depth), and
    what is left moves the step's depth: its relative factor is a mean starting from 0 (the
    start-up figure) worth :data:`PRIOR_STEPS` steps, exponentially weighted (:data:`ALPHA`) once
    enough steps are in. The policy compares depths at one load, so only the relative factors
    decide: in effect an explored step is compared with the steps around it. A residual past
    :data:`CLIP` times counts as that (a preempted step is not the cost)."""

    def __init__(self, prior: StepCosts) -> None:
        self.prior = prior
        self.depth = len(prior.spec)
        self._load: dict[int, float] = {}  # bucket -> log load factor
        self._rel: dict[int, list[float]] = {}  # bucket -> per depth log relative factor
        self._n: dict[int, list[int]] = {}  # bucket -> per depth measured steps

    def observe(self, batch: int, depth: int, seconds: float) -> None:
        """One measured decode step of ``batch`` sequences with ``depth`` drafts each (0: plain)."""
        if not 0 <= depth <= self.depth or batch < 1 or not seconds > 0:
            raise ValueError(f"a step of batch {batch}, depth {depth} (K={self.depth}) taking {seconds} s")
        t = self.prior.at(batch)
        if t is None:
            return  # past a complete measurement: nothing speculates there
        b = bucket(batch)
        if b not in self._load:
            self._load[b], self._rel[b], self._n[b] = 0.0, [0.0] * (self.depth + 1), [0] * (self.depth + 1)
        rel, ns = self._rel[b], self._n[b]
        r = math.log(seconds / (t[0] if depth == 0 else t[1][depth - 1])) - self._load[b] - rel[depth]
        if sum(ns) >= CLIP_AFTER:
            r = min(max(r, -math.log(CLIP)), math.log(CLIP))
        self._load[b] += LOAD_ALPHA * r
        rel[depth] += max(ALPHA, 1.0 / (ns[depth] + 1 + PRIOR_STEPS)) * (1.0 - LOAD_ALPHA) * r
        ns[depth] += 1

    def at(self, batch: int) -> list[float] | None:
        """Expected seconds of a step at ``batch`` with 0, 1, ..., K drafts, or None past a complete
        start-up measurement."""
        t = self.prior.at(batch)
        if t is None:
            return None
        b = bucket(batch)
        load, rel = self._load.get(b, 0.0), self._rel.get(b)
        return [base * math.exp(load + (rel[d] if rel else 0.0)) for d, base in enumerate([t[0], *t[1]])]

    def measured(self, batch: int, depth: int) -> int:
        """Steps measured in ``batch``'s bucket at ``depth``."""
        ns = self._n.get(bucket(batch))
        return ns[depth] if ns else 0
