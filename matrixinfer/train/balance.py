"""DeepSeek-V3's auxiliary-loss-free load balancing: count each router's expert choices and nudge
its ``e_score_correction_bias`` (used for selection only) towards equal load."""

from __future__ import annotations

import torch
from torch import nn

from matrixinfer.model.moe import Gate, Routing


class ExpertLoad:
    """Counts routed tokens per expert for every :class:`Gate` of ``model`` (main and MTP blocks).

    Hooks the gates' forward, so any forward pass of the model is counted until :meth:`close`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, m in model.named_modules() if isinstance(m, Gate)]
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        self.counts = [torch.zeros(g.n_experts, dtype=torch.long) for g in self.gates]
        self._hooks = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i: int):
        def record(_module: nn.Module, _inputs: tuple, routing: Routing) -> None:
            ids = routing.topk_ids.reshape(-1)
            self.counts[i] += torch.bincount(ids, minlength=self.gates[i].n_experts).cpu()
        return record

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def fractions(self) -> list[torch.Tensor]:
        """Per gate, each expert's share of the routed (token, expert) assignments."""
        return [c.double() / max(int(c.sum()), 1) for c in self.counts]

    def max_over_mean(self) -> list[float]:
        """Per gate, the busiest expert's load divided by the mean load (1.0 is perfect balance)."""
        return [float(c.max()) / max(float(c.double().mean()), 1e-9) for c in self.counts]


@torch.no_grad()
def update_bias(gates: list[Gate], counts: list[torch.Tensor], gamma: float) -> None:
    """``bias += gamma * sign(mean_load - load)`` per expert: overloaded experts get picked less."""
    for gate, load in zip(gates, counts):
        bias = gate.e_score_correction_bias
        if bias is None:
            raise ValueError(f"gate with topk_method {gate.method!r} has no e_score_correction_bias to update")
        load = load.to(bias.device, torch.float32)
        bias += gamma * torch.sign(load.mean() - load)
