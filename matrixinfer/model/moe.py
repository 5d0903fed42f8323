"""DeepSeekMoE: the router (gate) as its own step, grouped routed experts, and shared experts.

Routing and expert computation are separate calls so that expert parallelism can put
dispatch/combine between them: ``route`` gives each token's experts and weights,
``Experts.forward`` runs every expert once over the tokens routed to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.model.layers import MLP

log = logging.getLogger(__name__)


@dataclass
class Routing:
    """Each token's chosen experts ``topk_ids [T, k]`` and their combine weights ``topk_weights [T, k]``."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


class Gate(nn.Module):
    """The router of both generations.

    V3 (``noaux_tc``): sigmoid scores; ``e_score_correction_bias`` is added for *selection only*;
    group-limited top-k (groups ranked by the sum of their two best biased scores); weights are the
    unbiased scores, optionally renormalised, times ``routed_scaling_factor``.
    V2 (``greedy`` / ``group_limited_greedy``): softmax scores; plain top-k or top-k within the
    ``topk_group`` groups with the highest max score; renormalised if ``norm_topk_prob`` else
    multiplied by ``routed_scaling_factor`` (DeepSeek-V2's reference behaviour).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
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
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None

    def _group_mask(self, choice: torch.Tensor, group_score: str) -> torch.Tensor:
        grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
        if group_score == "top2sum":
            scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            scores = grouped.max(dim=-1).values
        idx = scores.topk(self.topk_group, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
        return mask[:, :, None].expand_as(grouped).reshape(-1, self.n_experts)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        if self.method == "noaux_tc" and self.scoring == "sigmoid" and self.n_experts <= 1024 and kernels.usable(logits):
            return Routing(*kernels.v3_route(logits, self.e_score_correction_bias.float().contiguous(), self.n_group,
                                             self.topk_group, self.top_k, self.norm, self.scaling))
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if self.method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float()
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


class Experts(nn.Module):
    """Routed experts stored stacked: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.

    Tokens are sorted by expert and each expert with work runs one matmul over its whole slice.
    """

    def __init__(self, n_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))

    grouped_mm_ok = True  # cleared if torch._grouped_mm rejects this device/dtype (then per-expert matmuls)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if kernels.usable(x, self.gate_up_proj):  # one native call: bucketing, both projections, combine
            return kernels.moe_experts(x.contiguous(), routing.topk_ids.contiguous(),
                                       routing.topk_weights.float().contiguous(), self.gate_up_proj, self.down_proj)
        if x.device.type == "cuda" and Experts.grouped_mm_ok:
            try:
                return self.grouped(x, routing)
            except (RuntimeError, NotImplementedError) as exc:
                Experts.grouped_mm_ok = False
                log.warning("grouped matmul unavailable (%s): routed experts fall back to per-expert matmuls", exc)
        t, k = routing.topk_ids.shape
        flat_ids = routing.topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_ids, minlength=self.n_experts)
        xs = x[token_of]
        cap = int(counts.max())
        # One padded bmm per projection runs the padding rows too; one matmul per expert pays a call
        # (~30 us on a CPU) twice per expert. Pad while the wasted multiply-adds cost less than the
        # calls (about 0.8M MACs per expert at ~80 GFLOP/s): decode batches, not skewed prefills.
        if (cap * self.n_experts - t * k) * x.shape[1] * self.inter <= self.n_experts * 800_000:
            ys = self._padded(xs, flat_ids[order], counts, cap)
        else:  # skewed load: one matmul per expert over its contiguous slice
            ys = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n == 0:
                    continue
                chunk = xs[start:start + n]
                gate, up = F.linear(chunk, self.gate_up_proj[e]).chunk(2, dim=-1)
                ys[start:start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start += n
        w = routing.topk_weights.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, ys * w[:, None])
        return out

    def grouped(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """All experts as two grouped matmuls over the rows sorted by expert, with the group
        offsets kept on the device: no host synchronisation (the CUDA path)."""
        flat_ids = routing.topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // routing.topk_ids.shape[1]
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        gate, up = torch._grouped_mm(x[token_of], self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        w = routing.topk_weights.reshape(-1)[order].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys * w[:, None])

    def _padded(self, xs: torch.Tensor, sorted_ids: torch.Tensor, counts: torch.Tensor, cap: int) -> torch.Tensor:
        """All experts at once on an ``[E, cap, H]`` layout (rows sorted by expert, zero padding)."""
        n = xs.shape[0]
        starts = counts.cumsum(0) - counts
        slot = sorted_ids * cap + (torch.arange(n, device=xs.device) - starts[sorted_ids])
        padded = xs.new_zeros(self.n_experts * cap, xs.shape[1]).index_copy_(0, slot, xs)
        padded = padded.view(self.n_experts, cap, -1)
        gate, up = torch.bmm(padded, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))
        return y.reshape(self.n_experts * cap, -1).index_select(0, slot)


class MoE(nn.Module):
    """A DeepSeekMoE layer: shared experts on every token plus the routed experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None

    def route(self, x: torch.Tensor) -> Routing:
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.route(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
