"""``matrixinfer ep-load``: the per-rank and per-expert load snapshot of a running EP instance
(``GET /ep/load`` of its API server), as JSON on stdout or in a file; ``matrixinfer eplb``: a
placement with redundant experts computed from such a snapshot (:mod:`matrixinfer.parallel.eplb`)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ep-load", help="JSON snapshot of an EP instance's per-rank and per-expert load")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the instance's API server")
    p.add_argument("--output", "-o", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.set_defaults(func=_ep_load)
    register_eplb(sub)


def _ep_load(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/ep/load"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            snap = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {url}: HTTP {exc.code} ({exc.read()[:200].decode(errors='replace')})", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: {url}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(snap, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def register_eplb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eplb", help="expert placement with redundant experts from a load snapshot (prints the "
                       "balance before/after and the experts moved, writes the placement JSON)")
    p.add_argument("--snapshot", required=True, help="load snapshot JSON (matrixinfer ep-load / GET /ep/load)")
    p.add_argument("--since", default=None, help="an earlier snapshot: balance the load routed since then (a window)")
    p.add_argument("--ranks", type=int, required=True, help="EP ranks of the plan")
    p.add_argument("--redundant", type=int, default=0, help="extra expert slots for copies of hot experts")
    p.add_argument("--incremental", action="store_true",
                   help="move as few experts as possible from the current placement to reach --target")
    p.add_argument("--current", default=None, help="the current placement: a placement JSON written by this "
                   "command or a snapshot (default: the snapshot's placement if it has --ranks ranks, else contiguous)")
    p.add_argument("--target", type=float, default=1.05, help="balance target for --incremental (busiest rank / mean)")
    p.add_argument("--shared", action="store_true",
                   help="one placement for all MoE layers (from their summed loads) instead of one per layer")
    p.add_argument("--expert-bytes", type=int, default=0,
                   help="bytes of one expert's weights (3 x hidden x moe_intermediate x bytes per weight), "
                   "to report the bytes moved")
    p.add_argument("--output", "-o", default="placement.json", help="where to write the placement JSON")
    p.set_defaults(func=_eplb)


def _eplb(args: argparse.Namespace) -> int:
    try:
        return _eplb_run(args)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _read_json(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _snapshot_loads(snap: dict, path: str) -> list[list[float]]:
    loads = snap.get("expert_tokens")
    if not isinstance(loads, list) or not loads or not all(isinstance(row, list) and row for row in loads):
        raise ValueError(f"{path}: no per-expert loads (expected 'expert_tokens': [[tokens per expert], ...] "
                         f"per MoE layer, as matrixinfer ep-load writes)")
    n = len(loads[0])
    if any(len(row) != n for row in loads):
        raise ValueError(f"{path}: MoE layers list different numbers of experts")
    return [[float(x) for x in row] for row in loads]


def _eplb_run(args: argparse.Namespace) -> int:
    from matrixinfer.parallel.eplb import ReplicatedPlacement, moves_between, plan_incremental, plan_placement
    from matrixinfer.parallel.placement import ExpertPlacement

    snap = _read_json(args.snapshot)
    loads = _snapshot_loads(snap, args.snapshot)
    if args.since:
        old = _snapshot_loads(_read_json(args.since), args.since)
        if len(old) > len(loads) or any(len(a) != len(b) for a, b in zip(old, loads)):
            raise ValueError(f"{args.since} does not match {args.snapshot} (layers or experts differ)")
        loads = [[x - (old[i][e] if i < len(old) else 0.0) for e, x in enumerate(row)] for i, row in enumerate(loads)]
        if any(x < 0 for row in loads for x in row):
            raise ValueError(f"{args.since} has more tokens than {args.snapshot}: is it the earlier snapshot?")
    n_experts = len(loads[0])
    if args.shared:
        loads = [[sum(row[e] for row in loads) for e in range(n_experts)]]

    # the current placement: one table for every layer, or one per layer (a file this command wrote)
    src = _read_json(args.current) if args.current else snap
    tables: list[list[list[int]]]
    if "layers" in src:
        tables = [layer["slots"] for layer in src["layers"]]
    elif "placement" in src and len(src["placement"]) == args.ranks:
        tables = [src["placement"]]
    elif args.current:
        raise ValueError(f"{args.current}: no placement for {args.ranks} ranks ('placement' or 'layers')")
    else:
        tables = [ExpertPlacement.contiguous(n_experts, args.ranks).as_table()]
    if len(tables) not in (1, len(loads)):
        raise ValueError(f"the current placement has {len(tables)} layers, the loads {len(loads)}")
    currents = [ReplicatedPlacement.from_table(tables[min(i, len(tables) - 1)], n_experts) for i in range(len(loads))]
    for cur in currents:
        if cur.ep_size != args.ranks:
            raise ValueError(f"the current placement has {cur.ep_size} ranks, the plan --ranks {args.ranks}")

    layers: list[dict[str, Any]] = []
    total_moves = 0
    for i, (w, cur) in enumerate(zip(loads, currents)):
        if args.incremental:
            r = plan_incremental(w, cur, args.redundant, args.target)
            plan, after, moves, how = r.placement, r.balance_after, r.moves, ("incremental" if r.incremental
                                                                              else "from scratch")
        else:
            plan = plan_placement(w, args.ranks, args.redundant, cur)
            after, how = plan.balance(w), "from scratch"
            moves = moves_between(cur, plan)
        before = cur.balance(w)
        total_moves += moves
        moved = {r: sorted(set(n) - set(o)) for r, (o, n) in enumerate(zip(cur.slots, plan.slots)) if set(n) - set(o)}
        name = "all layers" if args.shared else f"layer {i}"
        print(f"{name}: max/mean {before:.3f} -> {after:.3f}, {moves} expert copies moved ({how})")
        if moved:
            print("  " + "; ".join(f"rank {r} <- {es}" for r, es in moved.items()))
        layers.append({"layer": "all" if args.shared else i, "slots": plan.as_table(), "balance_before": before,
                       "balance_after": after, "moves": moves, "plan": how,
                       "moved": {str(r): es for r, es in moved.items()}})
    out = {"ranks": args.ranks, "redundant": args.redundant, "n_experts": n_experts,
           "slots_per_rank": (n_experts + args.redundant) // args.ranks, "shared": args.shared,
           "layers": layers, "moves": total_moves, "expert_bytes": args.expert_bytes,
           "bytes_moved": total_moves * args.expert_bytes}
    before_mean = sum(x["balance_before"] for x in layers) / len(layers)
    after_mean = sum(x["balance_after"] for x in layers) / len(layers)
    print(f"mean over layers: max/mean {before_mean:.3f} -> {after_mean:.3f}; "
          f"{total_moves} expert copies moved" + (f" ({total_moves * args.expert_bytes / 2**20:.1f} MiB)"
                                                 if args.expert_bytes else ""))
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"placement written to {args.output}")
    return 0
