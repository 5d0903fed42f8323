"""When speculative decoding pays: a pure policy over measured step costs and measured acceptance.

A plain decode step of ``b`` sequences costs ``t_plain(b)`` and gives each sequence one token. A
speculative step with ``k`` drafts (``k`` passes of the MTP module, then one verification pass over
``b * (k + 1)`` tokens) costs ``t_k(b)`` and gives each sequence ``E_k = 1 + a1 + a1 a2 + ...``
(``k`` terms after the 1) tokens on average, where ``a_j`` is the measured acceptance of the j-th
draft given the earlier ones were accepted. The step uses the ``k <= K`` with the largest
``E_k t_plain(b) / t_k(b)``, provided it exceeds ``1 + margin``; otherwise it does not speculate.

Where a small batch is bound by reading weights (CPU decode, a GPU at small batch), ``t_spec(1)``
is close to ``t_plain(1)`` and speculation wins; as the batch grows the step becomes compute bound,
``t_spec`` approaches ``(K + 1) t_plain`` and a wide batch loses (the reference design's gain falls
from +49% at small batch to +6%, docs/reference-design.md §4). The costs are measured once at start-up
(:meth:`matrixinfer.engine.speculative.MTPSpeculator.measure_costs`); ``--speculative-max-batch``
replaces the model with a fixed cut-off. Torch-free and I/O-free, so it is tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_ACCEPTANCE = 0.6  # before any draft is verified (the reference design measures ~0.7, the demo model 0.64-0.68)
PRIOR_WEIGHT = 8.0  # how many verified drafts the prior is worth
DECAY = 0.999  # per verification: the estimate follows the traffic over the last few thousand drafts
MARGIN = 0.05  # speculate only when it is expected to be at least 5% faster
EXPLORE_EVERY = 16  # a declining policy still verifies one draft every this many steps where it could pay
EXPLORE_EARLY = 4  # ... every this many while that depth has fewer verified drafts than the prior's weight


@dataclass(frozen=True)
class StepCosts:
    """Seconds per decode step, measured at batch sizes ``batches`` (ascending): ``plain`` without
    speculation, ``spec[k - 1]`` with ``k`` drafts per sequence. ``complete`` says the measurement
    stopped because speculation could no longer pay at any acceptance (so larger batches never
    speculate); otherwise it stopped for lack of KV blocks and larger batches extrapolate the last
    two points."""

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

    def at(self, batch: int) -> tuple[float, list[float]] | None:
        """``(t_plain, [t_1, ..., t_K])`` at ``batch`` (linear between measured sizes), or None past a
        complete measurement."""
        if batch > self.batches[-1] and self.complete:
            return None
        return self._interp(self.plain, batch), [self._interp(s, batch) for s in self.spec]

    def _interp(self, ys: tuple[float, ...], batch: int) -> float:
        bs = self.batches
        if batch <= bs[0] or len(bs) == 1:
            return ys[0]
        i = next((j for j in range(1, len(bs)) if bs[j] >= batch), len(bs) - 1)
        w = (batch - bs[i - 1]) / (bs[i] - bs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])


class AcceptanceTracker:
    """The acceptance of each draft depth, given the earlier drafts were accepted: exponentially
    decayed counts of verified drafts, each depth's estimate starting from a prior worth ``weight``
    drafts. The prior of the first depth is ``prior``; a deeper one's is the estimate of the depth
    before it. A deeper draft is only verified where the policy chose to draft that deep, so with
    a fixed prior a pessimistic guess for it (0.6 where the demo model's second draft holds ~0.9 of
    the times the first does) kept the policy at one draft for the hundreds of steps its
    exploration needed to measure the second; the depth before is the better first guess."""

    def __init__(self, depth: int, prior: float = PRIOR_ACCEPTANCE, weight: float = PRIOR_WEIGHT,
                 decay: float = DECAY) -> None:
        if depth < 1:
            raise ValueError(f"draft depth must be at least 1, got {depth}")
        self.decay = decay
        self.prior = prior
        self.weight = weight  # the prior's weight, decayed with the counts
        self.tried = [0.0] * depth
        self.hits = [0.0] * depth

    def record(self, drafts: int, accepted: int) -> None:
        """One sequence's verification: ``accepted`` of its ``drafts`` drafts (a prefix) held."""
        if not 0 <= accepted <= drafts <= len(self.tried):
            raise ValueError(f"{accepted} accepted of {drafts} drafts (depth {len(self.tried)})")
        self.weight *= self.decay
        for j in range(len(self.tried)):
            self.tried[j] *= self.decay
            self.hits[j] *= self.decay
        for j in range(min(accepted + 1, drafts)):  # depths reached: every accepted one and the first rejected
            self.tried[j] += 1.0
            self.hits[j] += 1.0 if j < accepted else 0.0

    def measured(self, depth: int) -> float:
        """Verified drafts at ``depth`` (1-based; decayed counts)."""
        return self.tried[depth - 1]

    def rates(self) -> list[float]:
        out: list[float] = []
        prior = self.prior
        for h, t in zip(self.hits, self.tried):
            prior = (h + self.weight * prior) / (t + self.weight) if t + self.weight > 0 else prior
            out.append(prior)
        return out

    def expected_tokens(self, drafts: int) -> float:
        """Tokens a sequence is expected to gain from a step verifying ``drafts`` drafts."""
        total, reach = 1.0, 1.0
        for a in self.rates()[:drafts]:
            reach *= a
            total += reach
        return total


class SpecPolicy:
    """How many drafts (0: none) the next decode step, with ``batch`` decoding sequences, verifies.

    With ``max_batch`` set, all ``drafts`` exactly when ``batch <= max_batch``; otherwise the count
    the cost model expects to produce the most tokens per second, if that beats a plain step by the
    margin (see the module doc).
    """

    def __init__(self, drafts: int, tracker: AcceptanceTracker, costs: StepCosts | None = None,
                 max_batch: int | None = None, margin: float = MARGIN) -> None:
        if costs is None and max_batch is None:
            raise ValueError("the speculation policy needs measured step costs or a maximum batch")
        self.drafts = drafts
        self.tracker = tracker
        self.costs = costs
        self.max_batch = max_batch
        self.margin = margin
        self.explore_every = EXPLORE_EVERY
        self.explore_early = EXPLORE_EARLY
        self._declined = 0

    def choose(self, batch: int) -> int:
        if batch < 1:
            return 0
        if self.max_batch is not None:
            return self.drafts if batch <= self.max_batch else 0
        assert self.costs is not None
        t = self.costs.at(batch)
        if t is None:
            return 0
        plain, spec = t
        best, best_gain = 0, 1.0 + self.margin
        for k, cost in enumerate(spec[:self.drafts], start=1):
            gain = self.tracker.expected_tokens(k) * plain / cost
            if gain > best_gain:
                best, best_gain = k, gain
        return best

    def decide(self, batch: int) -> int:
        """The engine's per-step draft count: :meth:`choose` (``k``), except that after
        ``explore_every`` steps in a row at fewer than the configured drafts (``explore_early``
        while depth ``k + 1`` has fewer verified drafts than the prior is worth), at a batch where
        ``k + 1`` drafts would pay if every one were accepted, one step verifies ``k + 1``.
        Acceptance is only measured by verifying (a depth only when the drafts before it held), so
        without this a pessimistic prior could keep the policy from ever speculating, or from ever
        drafting deeper than it starts; where one more draft is a close call (the demo model at
        batch 1: 1.37x either way at its first depth's acceptance), measuring it soon decides."""
        k = self.choose(batch)
        if k >= self.drafts or self.max_batch is not None or batch < 1:
            self._declined = 0
            return k
        self._declined += 1
        early = self.tracker.measured(k + 1) < PRIOR_WEIGHT
        if self._declined < (self.explore_early if early else self.explore_every):
            return k
        self._declined = 0
        assert self.costs is not None
        t = self.costs.at(batch)
        return k + 1 if t is not None and (k + 2) * t[0] / t[1][k] > 1.0 + self.margin else k

    def speculate(self, batch: int) -> bool:
        return self.choose(batch) > 0

    def break_even_batch(self, limit: int) -> int:
        """The largest batch up to ``limit`` that speculates now (0: none), for logs and reports."""
        return max((b for b in range(1, limit + 1) if self.speculate(b)), default=0)
