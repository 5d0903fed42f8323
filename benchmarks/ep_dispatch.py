"""EP dispatch + combine over gloo ranks on this host, same run: fp32 vs bf16 vs INT8 dispatch at
EP 2 and 4, against an all-gather baseline (every rank gathers every token, runs its experts on
all of them, and an all-reduce sums the outputs).

Each rank sends ``--tokens`` tokens of width ``--hidden`` with top-``--top-k`` routing, uniform
over ``--experts`` experts, through the real expert-parallel backend
(:class:`matrixinfer.parallel.ep_moe.ExpertParallelExperts`: encode, split sizes, all_to_all_single,
decode, combine); the experts are a weighted identity. A row's time is the backend's own dispatch
(encode, split sizes, all-to-all, decode) and combine (all-to-all, sum) time; the baseline's is its
all-gathers and all-reduce. Bytes per token are what a rank sent to other ranks per token of its
own batch (measured by the backend; the baseline's counted for a ring all-gather and all-reduce).
Times are the slowest rank's median of ``--iters`` calls; other processes share the cores, so
compare rows of one run. On one host the "network" is memory, so the bytes saved show in time
only where the link, not the packing, is the bottleneck.

    python benchmarks/ep_dispatch.py [--hidden 7168] [--tokens 128] [--experts 64] [--top-k 8] [--eps 2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from matrixinfer.model.experts import Experts, ExpertsBackend, Routing
from matrixinfer.parallel.dispatch import DISPATCH_DTYPES
from matrixinfer.parallel.ep_moe import ExpertParallelExperts
from matrixinfer.parallel.group import EPGroup, RankEnv
from matrixinfer.parallel.launch import free_port
from matrixinfer.parallel.placement import ExpertPlacement


class WeightedIdentity(ExpertsBackend):
    """``out = sum_j w_j * x``: experts that cost nothing, so only dispatch/combine are timed."""

    name = "weighted-identity"

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return x * routing.topk_weights.sum(1, keepdim=True).to(x.dtype)


def _routing(t: int, e: int, k: int, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    return Routing(ids, torch.rand(t, k, generator=g))


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    placement = ExpertPlacement.contiguous(a.experts, world)
    group = EPGroup(RankEnv(rank, world, "127.0.0.1", port), placement, timeout_s=120)
    experts = Experts(len(placement.experts_of(rank)), a.hidden, 1)
    backend = ExpertParallelExperts(experts, group, 0, WeightedIdentity(experts), a.hidden, a.top_k)
    x = torch.randn(a.tokens, a.hidden, generator=torch.Generator().manual_seed(rank))
    routing = _routing(a.tokens, a.experts, a.top_k, 100 + rank)
    rows: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for dtype in DISPATCH_DTYPES:
            group.dispatch_dtype = dtype
            for _ in range(3):
                backend.forward(x, routing)
            b0, c0 = group.dispatch_bytes, group.combine_bytes
            times = []
            for _ in range(a.iters):
                dist.barrier()
                t0 = group.dispatch_s + group.combine_s  # the backend times its dispatch and combine
                backend.forward(x, routing)
                times.append(group.dispatch_s + group.combine_s - t0)
            n = a.iters * a.tokens
            rows[dtype] = {"seconds": statistics.median(times), "dispatch_bytes_per_token":
                           (group.dispatch_bytes - b0) / n, "combine_bytes_per_token": (group.combine_bytes - c0) / n}
        rows["all-gather"] = _allgather_baseline(x, routing, world, a)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    group.close()


def _allgather_baseline(x: torch.Tensor, routing: Routing, world: int, a: argparse.Namespace) -> dict[str, float]:
    """All-gather x and the routing, weighted identity on every token, all-reduce, keep own rows."""
    t, h = x.shape
    times = []
    for i in range(a.iters + 3):
        dist.barrier()
        t0 = time.perf_counter()
        xs = torch.empty(world * t, h)
        dist.all_gather_single(xs, x)
        ids = torch.empty(world * t, a.top_k, dtype=torch.long)
        dist.all_gather_single(ids, routing.topk_ids)
        ws = torch.empty(world * t, a.top_k)
        dist.all_gather_single(ws, routing.topk_weights)
        gathered = time.perf_counter()
        out = xs * ws.sum(1, keepdim=True)  # (every rank would compute only its experts' share)
        t1 = time.perf_counter()
        dist.all_reduce(out)
        out = out[dist.get_rank() * t:(dist.get_rank() + 1) * t]
        if i >= 3:  # the collectives only, as for the EP rows (dispatch = encode..decode, combine = a2a..sum)
            times.append(gathered - t0 + time.perf_counter() - t1)
    row = h * 4 + a.top_k * 16  # fp32 activations, int64 ids, fp32 weights
    return {"seconds": statistics.median(times), "dispatch_bytes_per_token": (world - 1) * row,
            "combine_bytes_per_token": 2 * (world - 1) * h * 4}  # ring all-reduce of W*T rows, per own token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=7168, help="token width (DeepSeek-V3: 7168)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank per call (a decode batch)")
    p.add_argument("--experts", type=int, default=64, help="routed experts")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--eps", default="2,4", help="EP degrees")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    results = {}
    print(f"hidden {a.hidden}, {a.tokens} tokens/rank, {a.experts} experts, top-{a.top_k}, gloo on loopback; "
          "median of", a.iters)
    print(f"{'EP':>3} {'mode':>10} {'ms/call':>8} {'dispatch B/tok':>15} {'combine B/tok':>14} "
          f"{'dispatch vs bf16':>17} {'time vs all-gather':>19}")
    for ep in (int(e) for e in a.eps.split(",")):
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_rank, args=(ep, free_port(), a, d), nprocs=ep, join=True)
            ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(ep)]
        modes = {m: {k: statistics.mean(r[m][k] for r in ranks) for k in ranks[0][m]} for m in ranks[0]}
        modes = {m: dict(v, seconds=max(r[m]["seconds"] for r in ranks)) for m, v in modes.items()}  # slowest rank
        results[ep] = modes
        bf16, base = modes["bf16"]["dispatch_bytes_per_token"], modes["all-gather"]["seconds"]
        for m, v in modes.items():
            print(f"{ep:>3} {m:>10} {v['seconds'] * 1e3:8.2f} {v['dispatch_bytes_per_token']:15.0f} "
                  f"{v['combine_bytes_per_token']:14.0f} {v['dispatch_bytes_per_token'] / bf16:17.3f} "
                  f"{v['seconds'] / base:19.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
