"""Dispatch and combine of the expert-parallel backend, timed over real gloo ranks on this host.

Each rank sends ``tokens`` tokens of the model's width with top-k routing drawn uniformly over
the model's experts through :class:`matrixinfer.parallel.ep_moe.ExpertParallelExperts` (encode,
split sizes, all-to-all, decode; all-to-all back, weighted sum), the backend's own timers split
the two halves. The experts themselves are a weighted identity, so only dispatch and combine are
timed (the experts are profiled as ``experts``). A point's time is the slowest rank's mean.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from matrixinfer.model.experts import ExpertsBackend, Routing


class _WeightedIdentity(ExpertsBackend):
    name = "weighted-identity"

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return x * routing.topk_weights.sum(1, keepdim=True).to(x.dtype)


def _rank(rank: int, world: int, port: int, shape: tuple[int, int, int, str], tokens: list[int],
          reps: int, out_dir: str) -> None:
    import torch.distributed as dist

    from matrixinfer.model.experts import Experts
    from matrixinfer.parallel.ep_moe import ExpertParallelExperts
    from matrixinfer.parallel.group import EPGroup, RankEnv
    from matrixinfer.parallel.placement import ExpertPlacement

    hidden, n_experts, top_k, dtype = shape
    torch.set_num_threads(1)
    placement = ExpertPlacement.contiguous(n_experts, world)
    group = EPGroup(RankEnv(rank, world, "127.0.0.1", port), placement, dispatch_dtype=dtype, timeout_s=120)
    experts = Experts(len(placement.experts_of(rank)), hidden, 1)
    backend = ExpertParallelExperts(experts, group, 0, _WeightedIdentity(experts), hidden, top_k)
    gen = torch.Generator().manual_seed(rank)
    out: dict[str, list[float]] = {}
    with torch.inference_mode():
        for t in tokens:
            x = torch.randn(t, hidden, generator=gen)
            routing = Routing(torch.rand(t, n_experts, generator=gen).topk(top_k, dim=1).indices,
                              torch.rand(t, top_k, generator=gen))
            for _ in range(2):
                backend.forward(x, routing)
            disp, comb = [], []
            for _ in range(reps):
                dist.barrier()
                d0, c0 = group.dispatch_s, group.combine_s
                backend.forward(x, routing)
                disp.append(group.dispatch_s - d0)
                comb.append(group.combine_s - c0)
            out[str(t)] = [statistics.fmean(disp), statistics.fmean(comb)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    group.close()


def profile_dispatch_combine(ep: int, hidden: int, n_experts: int, top_k: int, tokens: list[int], reps: int,
                             dispatch_dtype: str = "fp32") -> dict[int, tuple[float, float]]:
    """``{tokens per rank: (dispatch s, combine s)}`` at EP ``ep``, the slowest rank's means."""
    import torch.multiprocessing as mp

    from matrixinfer.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(ep, free_port(), (hidden, n_experts, top_k, dispatch_dtype), tokens, reps, d),
                 nprocs=ep, join=True)
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(ep)]
    return {t: (max(r[str(t)][0] for r in ranks), max(r[str(t)][1] for r in ranks)) for t in tokens}


def available() -> bool:
    """Whether the expert-parallel backend is part of this build."""
    try:
        import matrixinfer.parallel.ep_moe  # noqa: F401
    except ImportError:
        return False
    return os.name == "posix"
