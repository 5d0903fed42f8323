"""DES speed bar: 10 simulated minutes of the paper's decode load in under 60 s on one core.

Prints the wall time, the ratio to the 60 s bar, and the DES vs step-model throughput agreement.
Run: python benchmarks/sim_des_speed.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import time

from matrixinfer.sim.des import simulate
from matrixinfer.sim.paper import paper_decode
from matrixinfer.sim.scenarios import paper_decode_load
from matrixinfer.sim.shapes import deepseek_r1

BAR_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()
    shapes = deepseek_r1()
    dep, wl = paper_decode_load(shapes)
    start = time.perf_counter()
    res = simulate(dep, wl, args.minutes * 60, warmup_s=60.0)
    wall = time.perf_counter() - start
    step = paper_decode(shapes, 96, 4096, 256)
    print(f"simulated {args.minutes:.0f} min ({res.completed:,} requests, {res.wall_events:,} "
          f"batch events) in {wall:.1f} s; bar {BAR_S:.0f} s -> {wall / BAR_S:.2f}x of budget")
    print(f"decode tok/s/chip DES {res.output_tok_s_per_decode_chip:,.0f} vs step model "
          f"{step.tokens_per_s_per_chip:,.0f} "
          f"({res.output_tok_s_per_decode_chip / step.tokens_per_s_per_chip - 1:+.1%})")
    return 0 if wall < BAR_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
