"""When speculative decoding pays: a pure policy over measured step costs and measured acceptance.

A plain decode step of ``b`` sequences costs ``t_0(b)`` and gives each sequence one token. A
speculative step with ``k`` drafts (``k`` passes of the MTP module, then one verification pass over
``b * (k + 1)`` tokens) costs ``t_k(b)`` and gives each sequence ``E_k = 1 + a1 + a1 a2 + ...``
(``k`` terms after the 1) tokens on average, where ``a_j`` is the measured acceptance of the j-th
draft given the earlier ones were accepted. The step uses the ``k <= K`` with the most expected
tokens per second, ``E_k / t_k(b)``, provided it beats a plain step's ``1 / t_0(b)`` by ``margin``.

Where a small batch is bound by reading weights (CPU decode, a GPU at small batch), ``t_k(1)``
is close to ``t_0(1)`` and speculation wins; as the batch grows the step becomes compute bound,
``t_k`` approaches ``(k + 1) t_0`` and a wide batch loses (the reference design's gain falls
from +49% at small batch to +6%, docs/reference-design.md §4). The costs are measured at start-up
(:meth:`matrixinfer.engine.speculative.MTPSpeculator.measure_costs`, the prior) and then learned
from the engine's own steps (:class:`~matrixinfer.engine.step_costs.LearnedCosts`, fed by
:meth:`SpecPolicy.observe`); a depth the policy is not using is still run now and then, at a rate
that bounds what measuring it costs (:data:`EXPLORE_BUDGET`), so its cost and acceptance stay
measured. ``--speculative-max-batch`` replaces the model with a fixed cut-off. Torch-free and
I/O-free, so it is tested directly (tests/engine/test_spec_policy.py).
"""

from __future__ import annotations

from matrixinfer.engine.step_costs import LearnedCosts, StepCosts, bucket

PRIOR_ACCEPTANCE = 0.6  # before any draft is verified (the reference design measures ~0.7, the demo model 0.64-0.68)
PRIOR_WEIGHT = 8.0  # how many verified drafts the prior is worth
DECAY = 0.99  # per verification: about the last hundred drafts (acceptance falls within a long request)
MARGIN = 0.05  # speculate only when it is expected to be at least 5% faster
EXPLORE_BUDGET = 0.0025  # share of throughput that running one other depth now and then may cost
EXPLORE_MIN = 4  # ... at most once every this many steps (in a batch bucket)
EXPLORE_MAX = 512  # ... and at least once every this many
EXPLORE_SETTLE = 8  # turns of a depth in a batch bucket before they are spaced in full (the n-th at n / 8)
EXPLORE_RUN = 3  # steps in a turn (the engine measures those after the first)


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

    With ``max_batch`` set, all ``drafts`` exactly when ``batch <= max_batch``; otherwise the depth
    the cost model expects to produce the most tokens per second, if that beats a plain step by the
    margin (see the module doc), learning the costs from :meth:`observe`.
    """

    def __init__(self, drafts: int, tracker: AcceptanceTracker, costs: StepCosts | None = None,
                 max_batch: int | None = None, margin: float = MARGIN) -> None:
        if costs is None and max_batch is None:
            raise ValueError("the speculation policy needs measured step costs or a maximum batch")
        if costs is not None and len(costs.spec) < drafts:
            raise ValueError(f"step costs for {len(costs.spec)} draft depths; the policy drafts up to {drafts}")
        self.drafts = drafts
        self.tracker = tracker
        self.costs = costs
        self.learned = LearnedCosts(costs) if costs is not None else None
        self.max_batch = max_batch
        self.margin = margin
        self.explore_budget = EXPLORE_BUDGET
        self._steps: dict[int, int] = {}  # batch bucket -> decisions made there
        self._last: dict[int, list[int]] = {}  # batch bucket -> per depth, the decision it last ran at
        self._runs: dict[int, list[int]] = {}  # batch bucket -> per depth, turns it was explored
        self._turn: tuple[int, int, int] | None = None  # (bucket, depth, steps left) of an exploring turn

    @property
    def limit(self) -> int | None:
        """The largest batch that may ever speculate (None: any): a step with more decoding
        sequences skips the policy altogether."""
        if self.max_batch is not None:
            return self.max_batch
        assert self.costs is not None
        return self.costs.limit

    def step_costs(self, batch: int) -> list[float] | None:
        """Expected seconds of a step at ``batch`` with 0..K drafts (None: past the measured range)."""
        return self.learned.at(batch) if self.learned is not None else None

    def token_rates(self, batch: int) -> list[float] | None:
        """Expected tokens per second per sequence at ``batch`` with 0..``drafts`` drafts."""
        t = self.step_costs(batch)
        return None if t is None else self._rates(t)

    def _rates(self, costs: list[float]) -> list[float]:
        out, tokens, reach = [1.0 / costs[0]], 1.0, 1.0
        for k, a in enumerate(self.tracker.rates()[:self.drafts], start=1):
            reach *= a
            tokens += reach
            out.append(tokens / costs[k])
        return out

    def _best(self, rates: list[float]) -> int:
        best, best_rate = 0, rates[0] * (1.0 + self.margin)
        for k in range(1, self.drafts + 1):
            if rates[k] > best_rate:
                best, best_rate = k, rates[k]
        return best

    def choose(self, batch: int) -> int:
        """The depth expected to pay most now (no exploration)."""
        if batch < 1:
            return 0
        if self.max_batch is not None:
            return self.drafts if batch <= self.max_batch else 0
        rates = self.token_rates(batch)
        return 0 if rates is None else self._best(rates)

    def ahead(self, batch: int) -> int:
        """The drafts the next decode step at ``batch`` is expected to verify, for drafting them
        ahead (:meth:`matrixinfer.engine.speculative.MTPSpeculator.draft_ahead`): the depth of an
        exploring turn that goes on in ``batch``'s bucket, else :meth:`choose`. (Drafting only the
        chosen depth ahead made every explored step of a deeper one run a draft call of its own,
        which the policy then counted in that depth's cost: on the demo model at batch 1 two drafts
        were measured at 1.5x one draft's step, where steps always drafting two cost ~1.25x, and
        the policy stayed at one draft.)"""
        if self._turn is not None and self._turn[0] == bucket(batch) and self._turn[2] > 0:
            return self._turn[1]
        return self.choose(batch)

    def decide(self, batch: int) -> int:
        """The engine's per-step draft count: :meth:`choose`, except that a depth not chosen runs once
        its turn comes, so its cost and acceptance stay measured (acceptance at depth j is only
        measured by running j, and only where the drafts before it held). Without this the
        start-up measurement's noise, or a pessimistic acceptance prior, could keep the policy from
        ever speculating, or from ever drafting deeper than it starts.

        A turn is :data:`EXPLORE_RUN` steps in a row: the engine measures only steps at the depth
        of the step before (:meth:`matrixinfer.engine.speculative.MTPSpeculator.observe_step`), as
        the first after a change runs on caches the other depth filled (and the first to draft
        after plain steps also catches up their MTP rows). A depth's turn comes every
        ``EXPLORE_RUN * extra / explore_budget`` steps in this batch bucket (within
        :data:`EXPLORE_MIN`..:data:`EXPLORE_MAX` after the last), where ``extra`` is the time one
        step at that depth takes beyond what the chosen depth would take for the same tokens, as a
        share of a chosen step: so measuring each depth costs about ``explore_budget`` of
        throughput. A close call (the demo model's second draft at batch 1) runs every hundred steps
        or so, a depth far behind (speculation at a wide batch, where it may pay at all) every few
        hundred. The n-th turn of a depth in a bucket comes ``n / EXPLORE_SETTLE`` of that interval
        after the one before (:data:`EXPLORE_SETTLE`): until a depth has run a few times its cost
        and acceptance are guesses, and the choice between close depths rests on them."""
        if self.max_batch is not None or batch < 1:
            return self.choose(batch)
        costs = self.step_costs(batch)
        if costs is None:
            return 0
        b = bucket(batch)
        step = self._steps[b] = self._steps.get(b, 0) + 1
        last = self._last.setdefault(b, [0] * (self.drafts + 1))
        runs = self._runs.setdefault(b, [0] * (self.drafts + 1))
        if self._turn is not None and self._turn[0] == b and self._turn[2] > 0:  # a turn goes on
            _, due, left = self._turn
            self._turn = (b, due, left - 1)
            last[due] = step
            return due
        self._turn = None
        rates = self._rates(costs)
        k = self._best(rates)
        due, urgency = k, 1.0
        for j, rate in enumerate(rates):
            if j == k:
                continue
            # the time a step at j takes beyond what depth k would take for its tokens, per step at k
            extra = EXPLORE_RUN * costs[j] * max(0.0, 1.0 - rate / rates[k]) / costs[k]
            every = min(extra / self.explore_budget, EXPLORE_MAX) * min(1.0, runs[j] / EXPLORE_SETTLE)
            every = max(every, EXPLORE_MIN)
            if (step - last[j]) / every >= urgency:
                due, urgency = j, (step - last[j]) / every
        last[due] = step
        if due != k:
            runs[due] += 1
            self._turn = (b, due, EXPLORE_RUN - 1)
        return due

    def settled(self, batch: int) -> bool:
        """Whether exploration at ``batch`` runs at its steady rate: every depth but the chosen one has
        had :data:`EXPLORE_SETTLE` turns in the batch's bucket (True where the policy does not explore:
        a fixed cut-off, or a batch past the measured range). Before that, turns come sooner (see
        :meth:`decide`): at batch 1 on the demo model the first ~1,000 steps run ~10% of their steps
        at a depth not chosen, against 0.25% of throughput per depth afterwards. Benchmarks of the
        serving steady state warm up until this holds."""
        if self.max_batch is not None or batch < 1 or self.step_costs(batch) is None:
            return True
        runs = self._runs.get(bucket(batch), [0] * (self.drafts + 1))
        k = self.choose(batch)
        return all(n >= EXPLORE_SETTLE for j, n in enumerate(runs) if j != k)

    def observe(self, batch: int, depth: int, seconds: float) -> None:
        """A decode step the engine ran: ``batch`` decoding sequences, ``depth`` drafts each (0: a
        plain step), ``seconds`` as the engine times it (this thread's CPU time on the CPU, wall time on
        a GPU)."""
        if self.learned is not None and batch >= 1:
            self.learned.observe(batch, depth, seconds)

    def speculate(self, batch: int) -> bool:
        return self.choose(batch) > 0

    def break_even_batch(self, limit: int) -> int:
        """The largest batch up to ``limit`` that speculates now (0: none), for logs and reports."""
        return max((b for b in range(1, limit + 1) if self.speculate(b)), default=0)
