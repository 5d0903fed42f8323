"""Expert-load balancing on the demo model's own routing: record per-expert token counts of its MoE
layers (the router of the shipped checkpoint, float32, one process) over held-out stdlib code
windows, over the other half of that held-out code (``history``), and over a different mix (this
repository's docs, English prose), write them as load snapshots in ``GET /ep/load``'s shape, and
compare at EP ``--ep`` with ``--redundant`` slots:

- busiest rank / mean on the code load: contiguous placement, balanced without copies, with copies;
- after the shift to prose, from the code plan: the incremental plan (target: within 5% of the
  from-scratch plan's balance) against a plan from scratch (ranks relabelled to keep experts in
  place): balance and expert copies moved.

The snapshots can be fed to ``matrixinfer eplb --snapshot OUT/code.json ...``; ``history.json`` and
``code.json`` are the pair shipped in ``matrixinfer/assets/expert-load/`` for the simulator's
default-balance prefill skew (:mod:`matrixinfer.sim.expert_skew`). About 20 s on one core.

    python benchmarks/eplb_demo.py [--ep 4] [--redundant 4] [--windows 32] [--length 128] [--out /tmp/eplb-demo]
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import torch

from matrixinfer.model.default_model import SHIPPED
from matrixinfer.model.loader import load_model
from matrixinfer.parallel.eplb import ReplicatedPlacement, moves_between, plan_incremental, plan_placement, relabel
from matrixinfer.parallel.placement import ExpertPlacement
from matrixinfer.quant.calibration import nll, windows
from matrixinfer.train.balance import ExpertLoad

ROOT = Path(__file__).resolve().parent.parent


def record(model: torch.nn.Module, load: ExpertLoad, batch: torch.Tensor) -> list[list[int]]:
    load.reset()
    nll(model, batch)
    # the main model's MoE layers (the MTP block's gate is left out, as in the EP snapshot)
    return [c.tolist() for name, c in zip(load.names, load.counts) if not name.startswith("mtp")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--out", default="/tmp/eplb-demo")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(SHIPPED, dtype=torch.float32)
    n = model.config.n_routed_experts
    assert n, "the demo model has no routed experts"
    load = ExpertLoad(model)
    code = record(model, load, windows(SHIPPED, "builtin", args.length + 1, args.windows, half="evaluation"))
    # the other half of the held-out code: the "history" a default placement is planned on
    history = record(model, load, windows(SHIPPED, "builtin", args.length + 1, args.windows, half="calibration"))
    docs = sorted(glob.glob(str(ROOT / "docs" / "*.md")))
    prose = record(model, load, windows(SHIPPED, docs, args.length + 1, args.windows))
    load.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    contiguous = ExpertPlacement.contiguous(n, args.ep)
    for name, counts in (("code", code), ("prose", prose), ("history", history)):
        (out / f"{name}.json").write_text(json.dumps({"ep": args.ep, "placement": contiguous.as_table(),
                                                      "expert_tokens": counts}))
    cur = ReplicatedPlacement.from_placement(contiguous)
    slots = n + args.redundant
    print(f"demo model: {n} experts, {len(code)} MoE layers, {args.windows} x {args.length} tokens per mix; "
          f"EP {args.ep}, R = {args.redundant} ({slots} slots); busiest rank / mean")
    total_inc = total_scratch = 0
    for layer, (a, b) in enumerate(zip(code, prose)):
        plan_a = plan_placement(a, args.ep, args.redundant, cur)
        no_copies = plan_placement(a, args.ep, 0, cur)
        scratch = plan_placement(b, args.ep, args.redundant)
        scratch = ReplicatedPlacement(n, tuple(tuple(x) for x in relabel(scratch.as_table(), plan_a)))
        inc = plan_incremental(b, plan_a, args.redundant, target=scratch.balance(b) * 1.05)
        total_inc += inc.moves
        total_scratch += moves_between(plan_a, scratch)
        print(f"layer {layer}: code: contiguous {cur.balance(a):.3f}, no copies {no_copies.balance(a):.3f}, "
              f"R={args.redundant} {plan_a.balance(a):.3f} | prose on the code plan {plan_a.balance(b):.3f}: "
              f"incremental {inc.balance_after:.3f} ({inc.moves} moves, "
              f"{'walk' if inc.incremental else 'from scratch'}), from scratch {scratch.balance(b):.3f} "
              f"({moves_between(plan_a, scratch)} moves)")
    print(f"moves over all layers: incremental {total_inc} of {slots * len(code)} slots "
          f"({total_inc / (slots * len(code)):.0%}), from scratch {total_scratch}; snapshots in {out}")


if __name__ == "__main__":
    main()
