"""Expert-load balancing policy on skewed synthetic loads (shuffled Zipf), no model: busiest rank
over the mean before (contiguous placement) and after (``plan_placement`` with R redundant
slots), and after a workload shift (loads drawn again, different experts hot) the copies moved by
the incremental plan against a plan from scratch.

Loads: expert e's tokens are ``1e5 / rank(e)^s`` with ranks shuffled; the shifted load is
``mix * fresh + (1 - mix) * old`` (mix = 1: a new workload; 0.5: half of it). "from scratch" is
the largest-first packing for the new loads alone, its ranks relabelled to keep as many experts in
place as possible; "incremental" is ``plan_incremental`` with ``--target`` (busiest / mean).

    python benchmarks/eplb_zipf.py [--experts 64] [--eps 4,8] [--skews 0.8,1.0,1.2] [--target 1.05]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from matrixinfer.parallel.eplb import (
    ReplicatedPlacement,
    moves_between,
    plan_incremental,
    plan_placement,
    relabel,
)
from matrixinfer.parallel.placement import ExpertPlacement


def zipf(n: int, s: float, rng: random.Random) -> list[float]:
    w = [1e5 / (i + 1) ** s for i in range(n)]
    rng.shuffle(w)
    return [float(int(x)) for x in w]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--eps", default="4,8", help="EP sizes; R = one redundant slot per rank")
    ap.add_argument("--skews", default="0.8,1.0,1.2", help="Zipf exponents")
    ap.add_argument("--target", type=float, default=1.05)
    ap.add_argument("--seeds", type=int, default=5, help="workloads per row (figures are medians)")
    args = ap.parse_args()
    n = args.experts
    print(f"{n} experts; max/mean = busiest rank over the mean; moves = expert copies transferred; "
          f"median of {args.seeds} seeds")
    print(f"{'EP':>3} {'R':>3} {'s':>4} | {'before':>6} {'R=0':>6} {'after':>6} | shift {'mix':>3}: "
          f"{'scratch':>7} {'moves':>5} | {'incr':>5} {'moves':>5} | {'best':>5} {'moves':>5} | ms")
    for ep in (int(x) for x in args.eps.split(",")):
        redundant = ep
        slots = n + redundant
        contiguous = ReplicatedPlacement.from_placement(ExpertPlacement.contiguous(n, ep))
        for s in (float(x) for x in args.skews.split(",")):
            for mix in (1.0, 0.5):
                rows = []
                for seed in range(args.seeds):
                    rng = random.Random(seed)
                    a = zipf(n, s, rng)
                    b = [mix * x + (1 - mix) * y for x, y in zip(zipf(n, s, rng), a)]
                    plan_a = plan_placement(a, ep, redundant, contiguous)
                    no_copies = plan_placement(a, ep, 0, contiguous)
                    t0 = time.perf_counter()
                    inc = plan_incremental(b, plan_a, redundant, args.target)
                    ms = (time.perf_counter() - t0) * 1e3
                    scratch = plan_placement(b, ep, redundant)
                    scratch = ReplicatedPlacement(n, tuple(tuple(x) for x in relabel(scratch.as_table(), plan_a)))
                    best = plan_placement(b, ep, redundant, plan_a)
                    rows.append((contiguous.balance(a), no_copies.balance(a), plan_a.balance(a),
                                 scratch.balance(b), moves_between(plan_a, scratch), inc.balance_after, inc.moves,
                                 best.balance(b), moves_between(plan_a, best), ms))
                med = [statistics.median(col) for col in zip(*rows)]
                print(f"{ep:>3} {redundant:>3} {s:>4} | {med[0]:6.3f} {med[1]:6.3f} {med[2]:6.3f} | shift {mix:>3}: "
                      f"{med[3]:7.3f} {med[4]:5.0f} | {med[5]:5.3f} {med[6]:5.0f} | {med[7]:5.3f} {med[8]:5.0f} | "
                      f"{med[9]:.0f}   ({slots} slots)")


if __name__ == "__main__":
    main()
