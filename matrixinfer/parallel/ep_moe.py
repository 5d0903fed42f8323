"""The expert-parallel experts backend: dispatch, this rank's experts, combine.

A MoE layer routes first (every rank has the full router), then calls its experts backend; here
that backend sends each token once to every rank holding one of its top-k experts (with the
ids and weights of those experts), runs this rank's experts over what it received, and sends
one weighted row back per received row, which the source adds up. Dispatch and combine are
``all_to_all_single`` with the split sizes exchanged first, into reused buffers
(:meth:`EPGroup.buffer`). Shared experts stay on every rank (the MoE layer runs them).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from matrixinfer.model.experts import EXPERTS_BACKENDS, BackendUnavailable, Experts, ExpertsBackend, Routing
from matrixinfer.model.moe import MoE
from matrixinfer.parallel.dispatch import decode_rows, encode_rows, row_bytes
from matrixinfer.parallel.group import EPGroup

log = logging.getLogger(__name__)


class ExpertParallelExperts(ExpertsBackend):
    """Routed experts spread over the ranks of ``group``; ``inner`` computes this rank's shard
    (an :data:`EXPERTS_BACKENDS` backend over the local expert rows)."""

    name = "expert-parallel"
    # True so that Experts.forward never swaps in a local backend over this rank's shard (which would
    # be silently wrong); forward refuses autograd itself.
    differentiable = True

    def __init__(self, experts: Experts, group: EPGroup, moe_index: int, inner: ExpertsBackend,
                 hidden: int, top_k: int) -> None:
        super().__init__(experts)
        self.group, self.moe_index, self.inner = group, moe_index, inner
        self.hidden, self.top_k = hidden, top_k

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("expert-parallel experts run for inference only (no gradients through dispatch and "
                               "combine): use torch.no_grad() or torch.inference_mode()")
        g = self.group
        ids, w = routing.topk_ids, routing.topk_weights
        t, k = ids.shape
        h = x.shape[1]
        g.record(self.moe_index, ids)
        start = g.timed()
        # dispatch: one row per (token, destination rank), sorted by rank
        dest = g.rank_of[ids]
        hit = torch.zeros(t, g.world, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        to_rank, tok = hit.t().nonzero(as_tuple=True)
        send_counts = hit.sum(0)
        mine = dest[tok] == to_rank[:, None]
        lid = torch.where(mine, g.local_index[ids[tok]], -1)
        lw = torch.where(mine, w[tok].float(), 0.0)
        rb = row_bytes(h, k, g.dispatch_dtype)
        n_send = tok.shape[0]
        send = encode_rows(x[tok], lid, lw, g.dispatch_dtype, g.buffer("dispatch_send", n_send * rb).view(n_send, rb))
        send_split = [int(n) for n in send_counts.tolist()]
        recv_split = g.exchange_counts(send_counts.cpu() if g.device.type == "cpu" else send_counts)
        n_recv = sum(recv_split)
        recv = g.buffer("dispatch_recv", n_recv * rb).view(n_recv, rb)
        g.all_to_all(recv, send, recv_split, send_split, "dispatch")
        g.dispatch_bytes += (n_send - send_split[g.rank]) * rb
        xr, lr, wr = decode_rows(recv, h, k, g.dispatch_dtype, x.dtype)
        g.dispatch_s += g.timed() - start
        # this rank's experts, over the (row, slot) pairs that name one of them
        row, slot = (lr >= 0).nonzero(as_tuple=True)
        y = torch.zeros(n_recv, h, dtype=x.dtype, device=x.device)
        if row.numel():
            pair = self.inner.forward(xr[row], Routing(lr[row, slot][:, None], wr[row, slot][:, None]))
            y.index_add_(0, row, pair)
        # combine: each received row goes back to its source, which adds its rows up per token
        after = g.timed()
        elt = x.element_size()
        back = g.buffer("combine_recv", n_send * h * elt).view(x.dtype).view(n_send, h)
        g.all_to_all(back, y, send_split, recv_split, "combine")
        g.combine_bytes += (n_recv - recv_split[g.rank]) * h * elt
        out = torch.zeros_like(x).index_add_(0, tok, back)
        g.combine_s += g.timed() - after
        return out

    def empty_forward(self) -> None:
        """This layer's part in a step where this rank has no tokens."""
        dev = self.group.device
        x = torch.zeros(0, self.hidden, dtype=self.experts_dtype, device=dev)
        self.forward(x, Routing(torch.zeros(0, self.top_k, dtype=torch.long, device=dev),
                                torch.zeros(0, self.top_k, device=dev)))

    @property
    def experts_dtype(self) -> torch.dtype:
        """The dtype of the activations this layer sees (its experts' float dtype, else float32)."""
        for p in self.experts.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def shard_experts(experts: Experts, local: list[int]) -> None:
    """Keep only the expert rows ``local`` (in that order) of every stacked tensor of ``experts``
    (weights, INT8 scales, biases, smoothing vectors); the rest is freed."""
    n = experts.n_experts
    idx = torch.tensor(local, dtype=torch.long)
    for name, p in list(experts.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == n:
            setattr(experts, name, nn.Parameter(p.detach()[idx.to(p.device)].contiguous(), requires_grad=False))
    for name, b in list(experts.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == n:
            setattr(experts, name, b[idx.to(b.device)].contiguous())
    experts.n_experts = len(local)


def enable_expert_parallel(model: nn.Module, group: EPGroup) -> int:
    """Make every MoE layer of ``model`` (main layers; MTP modules are not run under EP) keep only
    this rank's experts and compute through :class:`ExpertParallelExperts`. Returns the number of
    MoE layers. Call after the model's compute backends are chosen."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.layers: not a DeepSeek causal LM")
    local = group.placement.experts_of(group.rank)
    group.backends.clear()
    for block in layers:
        moe = getattr(block, "mlp", None)
        if not isinstance(moe, MoE):
            continue
        if moe.gate.n_experts != group.placement.n_experts:
            raise ValueError(f"placement is for {group.placement.n_experts} experts; the model's MoE layers have "
                             f"{moe.gate.n_experts}")
        ex = moe.experts
        inner_name = ex.impl.name
        shard_experts(ex, local)
        try:
            inner = EXPERTS_BACKENDS[inner_name](ex)
        except BackendUnavailable:
            inner = EXPERTS_BACKENDS[ex.fallback_backend](ex)
        block.native = None  # the one-call native layer would compute every expert locally
        ex.impl = ExpertParallelExperts(ex, group, len(group.backends), inner, moe.gate.weight.shape[1], moe.gate.top_k)
        group.backends.append(ex.impl)
    log.info("EP rank %d/%d: %d MoE layers, experts %s, dispatch %s", group.rank, group.world, len(group.backends),
             local, group.dispatch_dtype)
    return len(group.backends)
