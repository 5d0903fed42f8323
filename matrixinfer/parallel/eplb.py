"""Expert-load balancing policy: redundant experts and re-placement (pure functions, no I/O).

The busiest EP rank sets the pace of every MoE layer, so a placement should even out the ranks'
expert load. Two levers, as in DeepSeek's EPLB (written here from the idea, not the code):

- *redundant experts*: ``R`` extra physical slots hold copies of hot experts; a token routed to a
  replicated expert goes to one copy (:func:`route_to_replicas`), so each copy carries
  ``load / copies``;
- *balanced packing*: the ``E + R`` slots go to the ``N`` ranks, ``(E + R) / N`` slots each, so
  that the busiest rank's load is as low as we can get it (largest-first greedy, then swaps).

:func:`plan_placement` computes a placement from scratch. :func:`plan_incremental` starts from
the current placement and makes the fewest moves it can (one move = one expert's weights copied
into a slot of some rank) until the busiest rank is within ``target`` of the mean; if the
from-scratch plan reaches the target with fewer moves (or the greedy walk cannot reach it), it
returns that plan, relabelled to keep as many experts where they are as possible.

Loads are one MoE layer's per-expert token counts (a row of the ``expert_tokens`` of
``GET /ep/load``, or the difference of two snapshots for a window). Balance is the busiest rank's
load over the mean over all ranks (1.0 = even; the simulator's ``imbalance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the placement policy (and the
    import torch  # simulator, which uses it) stays torch-free

from matrixinfer.parallel.placement import ExpertPlacement

_EPS = 1e-9


@dataclass(frozen=True)
class ReplicatedPlacement:
    """``slots[r]``: the logical experts in rank r's physical slots, in row order. Every logical
    expert is in at least one slot and no rank holds two copies of one expert. Physical slot
    ``p = r * slots_per_rank + i`` (for equal slot counts) is row i of rank r."""

    n_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.n_experts < 1 or not self.slots:
            raise ValueError(f"placement needs at least one expert and one rank, got {self.n_experts} "
                             f"experts over {len(self.slots)} ranks")
        seen = [0] * self.n_experts
        for r, experts in enumerate(self.slots):
            if len(set(experts)) != len(experts):
                raise ValueError(f"placement: rank {r} holds an expert twice ({list(experts)})")
            for e in experts:
                if not 0 <= e < self.n_experts:
                    raise ValueError(f"placement: rank {r} lists expert {e}; experts are 0..{self.n_experts - 1}")
                seen[e] += 1
        missing = [e for e, n in enumerate(seen) if n == 0]
        if missing:
            raise ValueError(f"placement: expert(s) {missing[:10]} are on no rank")

    @classmethod
    def from_placement(cls, placement: ExpertPlacement) -> ReplicatedPlacement:
        return cls(placement.n_experts, tuple(tuple(x) for x in placement.as_table()))

    @classmethod
    def from_table(cls, table: list[list[int]], n_experts: int) -> ReplicatedPlacement:
        return cls(n_experts, tuple(tuple(int(e) for e in x) for x in table))

    def to_placement(self) -> ExpertPlacement:
        """The one-copy :class:`ExpertPlacement` (only when there are no replicas)."""
        if self.n_redundant:
            raise ValueError(f"placement has {self.n_redundant} redundant slots; ExpertPlacement holds one copy each")
        return ExpertPlacement.from_table([list(x) for x in self.slots], self.n_experts)

    @property
    def ep_size(self) -> int:
        return len(self.slots)

    @property
    def n_slots(self) -> int:
        return sum(len(x) for x in self.slots)

    @property
    def n_redundant(self) -> int:
        return self.n_slots - self.n_experts

    @property
    def slots_per_rank(self) -> int:
        """The most slots one rank holds."""
        return max(len(x) for x in self.slots)

    def counts(self) -> list[int]:
        """Copies of each logical expert (EPLB's ``logcnt``)."""
        out = [0] * self.n_experts
        for experts in self.slots:
            for e in experts:
                out[e] += 1
        return out

    def phy2log(self) -> list[int]:
        """Physical slot -> logical expert, ranks in order."""
        return [e for experts in self.slots for e in experts]

    def log2phy(self) -> list[list[int]]:
        """Logical expert -> its physical slots, lowest first."""
        out: list[list[int]] = [[] for _ in range(self.n_experts)]
        for p, e in enumerate(self.phy2log()):
            out[e].append(p)
        return out

    def rank_loads(self, loads: list[float]) -> list[float]:
        """Each rank's load when every copy of expert e carries ``loads[e] / copies``."""
        return _rank_loads([list(x) for x in self.slots], list(map(float, loads)), self.counts())

    def balance(self, loads: list[float]) -> float:
        """Busiest rank over the mean over all ranks; 1.0 when nothing was routed."""
        return _balance(self.rank_loads(loads))

    def as_table(self) -> list[list[int]]:
        return [list(x) for x in self.slots]


def _rank_loads(slots: list[list[int]], w: list[float], c: list[int]) -> list[float]:
    return [sum(w[e] / c[e] for e in experts) for experts in slots]


def _balance(rank_loads: list[float]) -> float:
    total = sum(rank_loads)
    return max(rank_loads) / (total / len(rank_loads)) if total > 0 else 1.0


def moves_between(old: ReplicatedPlacement, new: ReplicatedPlacement) -> int:
    """Expert copies to transfer to turn ``old`` into ``new``: slots of rank r in ``new`` whose
    expert rank r did not hold in ``old`` (dropping a copy or reordering rows moves nothing)."""
    if old.ep_size != new.ep_size:
        raise ValueError(f"placements over {old.ep_size} and {new.ep_size} ranks")
    return sum(len(set(n) - set(o)) for o, n in zip(old.slots, new.slots))


def expert_bytes(hidden: int, moe_intermediate: int, bytes_per_weight: float = 2.0) -> int:
    """Bytes of one routed expert's weights (gate, up and down projections)."""
    return int(3 * hidden * moe_intermediate * bytes_per_weight)


def _check(loads: list[float], n_ranks: int, n_redundant: int) -> int:
    n = len(loads)
    if n < 1:
        raise ValueError("no expert loads given")
    if any(not 0 <= x < math.inf for x in loads):
        raise ValueError("expert loads must be finite non-negative numbers")
    if n_ranks < 1 or n_redundant < 0:
        raise ValueError(f"need ranks >= 1 and redundant >= 0, got {n_ranks} and {n_redundant}")
    if (n + n_redundant) % n_ranks:
        raise ValueError(f"{n} experts + {n_redundant} redundant slots do not divide over {n_ranks} ranks "
                         f"(every rank holds the same number of slots)")
    per_rank = (n + n_redundant) // n_ranks
    if per_rank > n:
        raise ValueError(f"{per_rank} slots per rank but only {n} experts (a rank holds an expert at most once)")
    return per_rank


def replica_counts(loads: list[float], n_redundant: int, n_ranks: int) -> list[int]:
    """Copies per logical expert: each redundant slot goes to the expert with the highest load per
    copy (ties: the lower id), at most one copy per rank."""
    if n_redundant > len(loads) * (n_ranks - 1):
        raise ValueError(f"{n_redundant} redundant slots for {len(loads)} experts over {n_ranks} ranks: an expert "
                         f"has at most one copy a rank")
    c = [1] * len(loads)
    for _ in range(n_redundant):
        best = max((e for e in range(len(loads)) if c[e] < n_ranks), key=lambda e: (loads[e] / c[e], -e))
        c[best] += 1
    return c


def _pack(w: list[float], c: list[int], n_ranks: int, per_rank: int) -> list[list[int]]:
    """Largest copy first onto the least loaded rank with a free slot that lacks that expert."""
    items = sorted(((w[e] / c[e], e) for e in range(len(w)) for _ in range(c[e])), key=lambda t: (-t[0], t[1]))
    slots: list[list[int]] = [[] for _ in range(n_ranks)]
    load = [0.0] * n_ranks
    for x, e in items:
        free = [r for r in range(n_ranks) if len(slots[r]) < per_rank]
        ok = [r for r in free if e not in slots[r]]
        if ok:
            r = min(ok, key=lambda r: (load[r], r))
        else:
            # Every rank with room already holds e: a full rank q without e gives rank r one of its
            # experts f that r lacks (q has more distinct experts than r, so one exists), and takes e.
            r = min(free, key=lambda r: (load[r], r))
            q = next(q for q in range(n_ranks) if e not in slots[q])
            f = next(f for f in slots[q] if f not in slots[r])
            slots[q].remove(f)
            slots[r].append(f)
            load[q] -= w[f] / c[f]
            load[r] += w[f] / c[f]
            r = q
        slots[r].append(e)
        load[r] += x
    return slots


def _improve(slots: list[list[int]], w: list[float], c: list[int], target: float,
             max_steps: int, allow_rereplicate: bool = True) -> int:
    """Greedy moves (in place) until balance <= target or no move lowers the busiest rank without
    lifting another to its level. A swap of two slots costs 2 moves; turning a copy of an expert
    with several into a copy of another expert costs 1 (a slot of the busiest rank into a copy of
    an expert it lacks, or a slot elsewhere into one more copy of an expert of the busiest rank).
    Each step takes the move with the most relief per move. Returns the steps taken."""
    n_ranks = len(slots)
    n = len(w)
    steps = 0
    while steps < max_steps:
        load = _rank_loads(slots, w, c)
        total = sum(load)
        if total <= 0:
            break
        peak = max(load)
        if peak <= target * total / n_ranks + _EPS * max(1.0, total):
            break
        p = max(range(n_ranks), key=lambda r: (load[r], -r))
        # (relief per move, -new worst, action): (0, p, i, q, j) swaps slot i of rank p with slot j
        # of rank q; (1, q, i, f, 0) makes slot i of rank q a copy of expert f
        best: tuple[float, float, tuple[int, int, int, int, int]] | None = None
        for i, a in enumerate(slots[p]):
            xa = w[a] / c[a]
            for q in range(n_ranks):
                if q == p:
                    continue
                for j, b in enumerate(slots[q]):
                    if b == a or b in slots[p] or a in slots[q]:
                        continue
                    xb = w[b] / c[b]
                    worst = max(load[p] - xa + xb, load[q] - xb + xa)
                    if worst < peak - _EPS * max(1.0, peak):
                        cand = ((peak - worst) / 2, -worst, (0, p, i, q, j))
                        if best is None or cand[:2] > best[:2]:
                            best = cand
            if allow_rereplicate and c[a] > 1:
                holders_a = [r for r in range(n_ranks) if r != p and a in slots[r]]
                for f in range(n):
                    if f in slots[p] or c[f] >= n_ranks:
                        continue
                    new_p = load[p] - xa + w[f] / (c[f] + 1)
                    worst = new_p
                    grow = w[a] / (c[a] - 1) - xa
                    for r in holders_a:
                        worst = max(worst, load[r] + grow)
                    if worst < peak - _EPS * max(1.0, peak):
                        cand = (peak - worst, -worst, (1, p, i, f, 0))
                        if best is None or cand[:2] > best[:2]:
                            best = cand
        if allow_rereplicate:
            # a spare copy elsewhere becomes one more copy of an expert of the busiest rank
            for q in range(n_ranks):
                if q == p:
                    continue
                for i, a in enumerate(slots[q]):
                    if c[a] < 2:
                        continue
                    grow = w[a] / (c[a] - 1) - w[a] / c[a]
                    touched = [r for r in range(n_ranks) if r != q and (r == p or a in slots[r])]
                    for f in slots[p]:
                        if f in slots[q] or c[f] >= n_ranks:
                            continue
                        shrink = w[f] / c[f] - w[f] / (c[f] + 1)
                        worst = load[q] - w[a] / c[a] + w[f] / (c[f] + 1)
                        for r in touched:
                            worst = max(worst, load[r] + (grow if a in slots[r] else 0.0)
                                        - (shrink if f in slots[r] else 0.0))
                        if worst < peak - _EPS * max(1.0, peak):
                            cand = (peak - worst, -worst, (1, q, i, f, 0))
                            if best is None or cand[:2] > best[:2]:
                                best = cand
        if best is None:
            break
        kind, p, i, q, j = best[2]
        if kind == 0:
            slots[p][i], slots[q][j] = slots[q][j], slots[p][i]
        else:
            f = q
            c[slots[p][i]] -= 1
            c[f] += 1
            slots[p][i] = f
        steps += 1
    return steps


def relabel(new: list[list[int]], old: ReplicatedPlacement) -> list[list[int]]:
    """Permute the ranks of ``new`` to keep the most experts in place (greedy on overlap)."""
    n_ranks = len(new)
    overlap = sorted(((len(set(new[i]) & set(old.slots[r])), i, r) for i in range(n_ranks) for r in range(n_ranks)),
                     key=lambda t: (-t[0], t[1], t[2]))
    target: list[int | None] = [None] * n_ranks
    used: set[int] = set()
    for _, i, r in overlap:
        if target[i] is None and r not in used:
            target[i] = r
            used.add(r)
    out: list[list[int]] = [[] for _ in range(n_ranks)]
    for i, dest in enumerate(target):
        assert dest is not None
        # keep the experts that stay in their old rows' order first, then the new ones
        kept = [e for e in old.slots[dest] if e in new[i]]
        out[dest] = kept + [e for e in new[i] if e not in kept]
    return out


def _fill(current: ReplicatedPlacement, w: list[float], per_rank: int) -> tuple[list[list[int]], list[int]]:
    """The current placement with its free slots (up to ``per_rank`` a rank) filled by copies:
    each new copy is the (expert, rank) pair that leaves the lowest peak load."""
    slots = [list(x) for x in current.slots]
    if any(len(x) > per_rank for x in slots):
        raise ValueError(f"the current placement holds {current.slots_per_rank} slots on a rank; the plan has "
                         f"{per_rank} a rank (fewer slots than now is not supported)")
    c = current.counts()
    n_ranks = len(slots)
    while True:
        free = [r for r in range(n_ranks) if len(slots[r]) < per_rank]
        if not free:
            return slots, c
        load = _rank_loads(slots, w, c)
        by_load = sorted(range(n_ranks), key=lambda r: -load[r])
        holders: list[list[int]] = [[] for _ in w]
        for r, experts in enumerate(slots):
            for e in experts:
                holders[e].append(r)
        best: tuple[float, float, int, int] | None = None
        for q in free:
            for e in range(len(w)):
                if e in slots[q] or c[e] >= n_ranks:
                    continue
                share = w[e] / (c[e] + 1)
                worst = load[q] + share
                # the other ranks: holders of e lose a little, the busiest non-holder keeps its load
                worst = max(worst, max((load[r] - (w[e] / c[e] - share) for r in holders[e]), default=0.0))
                worst = max(worst, next((load[r] for r in by_load if r != q and r not in holders[e]), 0.0))
                cand = (worst, -w[e] / c[e], q, e)
                if best is None or cand < best:
                    best = cand
        assert best is not None  # per_rank <= n_experts, so every free rank lacks some expert
        _, _, q, e = best
        slots[q].append(e)
        c[e] += 1


def plan_placement(loads: list[float], n_ranks: int, n_redundant: int = 0,
                   current: ReplicatedPlacement | None = None) -> ReplicatedPlacement:
    """From scratch: replica counts by load, balanced packing, then swaps to a local optimum. With
    ``current`` the result is never less balanced than ``current`` with its free slots filled, and
    its ranks are relabelled to keep as many experts in place as possible."""
    w = [float(x) for x in loads]
    per_rank = _check(w, n_ranks, n_redundant)
    c = replica_counts(w, n_redundant, n_ranks)
    slots = _pack(w, c, n_ranks, per_rank)
    _improve(slots, w, c, 1.0, max_steps=4 * (len(w) + n_redundant))
    plan = ReplicatedPlacement(len(w), tuple(tuple(x) for x in slots))
    if current is None:
        return plan
    _check_current(current, len(w), n_ranks)
    if current.slots_per_rank <= per_rank:
        kept, kc = _fill(current, w, per_rank)
        _improve(kept, w, kc, 1.0, max_steps=4 * (len(w) + n_redundant))
        alt = ReplicatedPlacement(len(w), tuple(tuple(x) for x in kept))
        if max(alt.rank_loads(w)) < max(plan.rank_loads(w)) - _EPS * max(1.0, sum(w)):
            plan = alt
    if max(plan.rank_loads(w)) > max(current.rank_loads(w)) + _EPS * max(1.0, sum(w)):
        # Still less balanced than now (it happens when the current ranks hold unequal numbers of
        # experts): spend the extra slots on copies of the coldest experts, which weigh little
        # wherever they land, and pack again.
        cold = [1] * len(w)
        for _ in range(n_redundant):
            e = min((e for e in range(len(w)) if cold[e] < n_ranks), key=lambda e: (w[e] / cold[e], e))
            cold[e] += 1
        slots = _pack(w, cold, n_ranks, per_rank)
        _improve(slots, w, cold, 1.0, max_steps=4 * (len(w) + n_redundant))
        alt = ReplicatedPlacement(len(w), tuple(tuple(x) for x in slots))
        if max(alt.rank_loads(w)) < max(plan.rank_loads(w)) - _EPS * max(1.0, sum(w)):
            plan = alt
    return ReplicatedPlacement(len(w), tuple(tuple(x) for x in relabel(plan.as_table(), current)))


def _check_current(current: ReplicatedPlacement, n_experts: int, n_ranks: int) -> None:
    if current.n_experts != n_experts or current.ep_size != n_ranks:
        raise ValueError(f"the current placement is for {current.n_experts} experts over {current.ep_size} ranks; "
                         f"the loads have {n_experts} experts and the plan {n_ranks} ranks")


@dataclass(frozen=True)
class Rebalance:
    """One layer's plan: the placement, its balance before and after, the copies to transfer, and
    whether the incremental walk (``incremental``) or the from-scratch plan was taken."""

    placement: ReplicatedPlacement
    balance_before: float
    balance_after: float
    moves: int
    incremental: bool


def plan_incremental(loads: list[float], current: ReplicatedPlacement, n_redundant: int,
                     target: float = 1.05) -> Rebalance:
    """From ``current``: fill its free slots (the plan has ``E + n_redundant`` slots), then the
    fewest greedy moves (swaps, or turning a spare copy into a copy of another expert) until the
    balance is <= ``target`` (and no worse than ``current``'s). If the from-scratch plan reaches
    the target with fewer moves, or the walk stops short of the target and the from-scratch plan
    is at least as balanced, that plan (relabelled) is returned instead: whenever the target is
    reached, the moves are no more than the from-scratch plan's."""
    if not target >= 1.0:
        raise ValueError(f"balance target must be >= 1.0 (busiest rank over the mean), got {target}")
    w = [float(x) for x in loads]
    n_ranks = current.ep_size
    per_rank = _check(w, n_ranks, n_redundant)
    _check_current(current, len(w), n_ranks)
    before = current.balance(w)
    full = plan_placement(w, n_ranks, n_redundant, current)
    full_moves = moves_between(current, full)
    full_bal = full.balance(w)
    if current.slots_per_rank <= per_rank:
        slots, c = _fill(current, w, per_rank)
        # new slots filled: walk on until the balance is also no worse than before
        _improve(slots, w, c, min(target, before), max_steps=4 * (len(w) + n_redundant))
        inc = ReplicatedPlacement(len(w), tuple(tuple(x) for x in slots))
        inc_moves, inc_bal = moves_between(current, inc), inc.balance(w)
        goal = min(target, before)  # a placement already within the target must not get worse
        inc_ok, full_ok = inc_bal <= goal + 1e-9, full_bal <= goal + 1e-9
        if inc_ok and full_ok:
            take_inc = inc_moves <= full_moves
        elif inc_ok or full_ok:
            take_inc = inc_ok
        else:  # neither reaches the target: the better balanced, on a tie the fewer moves
            take_inc = inc_bal < full_bal - 1e-9 or (inc_bal <= full_bal + 1e-9 and inc_moves <= full_moves)
        if take_inc:
            return Rebalance(inc, before, inc_bal, inc_moves, True)
    return Rebalance(full, before, full_bal, full_moves, False)


def route_to_replicas(topk_ids: torch.Tensor, placement: ReplicatedPlacement, offset: int = 0) -> torch.Tensor:
    """Physical slot of each (token, chosen expert): the j-th occurrence of expert e in
    ``topk_ids`` (row-major order) goes to copy ``(j + offset) % copies(e)``. Deterministic, and the
    copies of an expert get counts that differ by at most one (pass the rank as ``offset`` so that
    ranks routing their own batches do not all favour the first copy)."""
    import torch

    log2phy = placement.log2phy()
    width = max(len(x) for x in log2phy)
    table = torch.tensor([x + [x[0]] * (width - len(x)) for x in log2phy], dtype=torch.long)
    count = torch.tensor([len(x) for x in log2phy], dtype=torch.long)
    flat = topk_ids.reshape(-1).long()
    if flat.numel() == 0:
        return topk_ids.long().clone()
    order = torch.sort(flat, stable=True).indices
    ids_sorted = flat[order]
    pos = torch.arange(flat.numel())
    starts = torch.ones_like(ids_sorted, dtype=torch.bool)
    starts[1:] = ids_sorted[1:] != ids_sorted[:-1]
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=0).values
    occurrence = torch.empty_like(flat)
    occurrence[order] = pos - first
    copy = (occurrence + offset) % count[flat]
    return table[flat, copy].reshape(topk_ids.shape)
