"""DeepSeekMoE: the router (gate) as its own step, the routed experts, and shared experts.

Routing and expert computation are separate calls so that expert parallelism can put
dispatch/combine between them: ``route`` gives each token's experts and weights, the routed
experts (:mod:`matrixinfer.model.experts`, with their backends) run every expert once over the
tokens routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.model.backend import CustomOp
from matrixinfer.model.experts import Experts, Routing
from matrixinfer.model.layers import MLP

__all__ = ["Experts", "Gate", "MoE", "Routing"]


class Gate(CustomOp):
    """The router of both generations.

    V3 (``noaux_tc``): sigmoid scores; ``e_score_correction_bias`` is added for *selection only*;
    group-limited top-k (groups ranked by the sum of their two best biased scores); weights are the
    unbiased scores, optionally renormalised, times ``routed_scaling_factor``.
    V2 (``greedy`` / ``group_limited_greedy``): softmax scores; plain top-k or top-k within the
    ``topk_group`` groups with the highest max score; renormalised if ``norm_topk_prob`` else
    multiplied by ``routed_scaling_factor`` (DeepSeek-V2's reference behaviour).
    The ``cpu`` backend routes V3 in one native call (``small_ops.c``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.n_routed_experts is None or cfg.num_experts_per_tok is None:
            raise ValueError("a MoE layer needs n_routed_experts and num_experts_per_tok in the config")
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.method = cfg.topk_method
        self.scoring = cfg.scoring_func
        if self.method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method {self.method!r} is not supported")
        if self.scoring not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func {self.scoring!r} is not supported")
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        self.e_score_correction_bias: torch.Tensor | None
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None

    def correction_bias(self) -> torch.Tensor:
        """V3's ``e_score_correction_bias`` in float32 (added to the scores for selection only)."""
        if self.e_score_correction_bias is None:
            raise ValueError(f"topk_method {self.method!r} has no e_score_correction_bias")
        return self.e_score_correction_bias.float()

    def _group_mask(self, choice: torch.Tensor, group_score: str) -> torch.Tensor:
        grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
        if group_score == "top2sum":
            scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            scores = grouped.max(dim=-1).values
        idx = scores.topk(self.topk_group, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
        return mask[:, :, None].expand_as(grouped).reshape(-1, self.n_experts)

    def supports(self, backend: str) -> bool:
        if backend == "cpu":  # V3 routing; the logits are float32 whatever the model's dtype
            return (self.method == "noaux_tc" and self.scoring == "sigmoid" and self.n_experts <= 1024
                    and self.weight.is_cpu and kernels.available())
        return super().supports(backend)

    def forward_cpu(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        return Routing(*kernels.v3_route(logits, self.correction_bias().contiguous(), self.n_group,
                                         self.topk_group, self.top_k, self.norm, self.scaling))

    def forward_native(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if self.method == "noaux_tc":
            choice = scores + self.correction_bias()
            if self.n_group > 1:
                choice = choice.masked_fill(~self._group_mask(choice, "top2sum"), float("-inf"))
            ids = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, ids)
            if self.norm:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            weights = weights * self.scaling
        else:
            choice = scores
            if self.method == "group_limited_greedy" and self.n_group > 1:
                choice = scores.masked_fill(~self._group_mask(scores, "max"), 0.0)
            weights, ids = choice.topk(self.top_k, dim=-1)
            if self.norm and self.top_k > 1:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            else:
                weights = weights * self.scaling
        return Routing(ids, weights)


class MoE(nn.Module):
    """A DeepSeekMoE layer: shared experts on every token plus the routed experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(self.gate.n_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts: MLP | None = None
        if n_shared:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared)

    def route(self, x: torch.Tensor) -> Routing:
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.route(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
