"""The expert-parallel experts backend: dispatch, this rank's experts, combine.

A MoE layer routes first (every rank has the full router), then calls its experts backend; here
that backend sends each token once to every rank holding one of its top-k experts (with the
ids and weights of those experts), runs this rank's experts over what it received, and sends
one weighted row back per received row, which the source adds up. Dispatch and combine are
``all_to_all_single`` with the split sizes exchanged first, into reused buffers
(:meth:`EPGroup.buffer`), each started asynchronously and waited for after :meth:`EPGroup.pause`
(where, with ``--microbatches 2``, the other microbatch computes: :mod:`.microbatch`). Shared
experts stay on every rank (the MoE layer runs them).

Each layer has its own placement (:class:`~matrixinfer.parallel.eplb.ReplicatedPlacement`: the
experts in each rank's slots, hot ones possibly in several). A token routed to a replicated
expert goes to one copy (:func:`~matrixinfer.parallel.eplb.route_to_replicas`, offset by the
source rank). :meth:`ExpertParallelExperts.repartition` switches a layer to another placement,
moving the expert weights a rank lacks from a rank that holds them (one ``all_to_all_single``
per stacked tensor); every rank calls it at the same step boundary (:mod:`.dp_engine`).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from matrixinfer.model.experts import EXPERTS_BACKENDS, BackendUnavailable, Experts, ExpertsBackend, Routing
from matrixinfer.model.moe import MoE
from matrixinfer.parallel.dispatch import decode_rows, encode_rows, row_bytes
from matrixinfer.parallel.eplb import ReplicatedPlacement, route_to_replicas
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
                 hidden: int, top_k: int, placement: ReplicatedPlacement | None = None) -> None:
        super().__init__(experts)
        self.group, self.moe_index, self.inner = group, moe_index, inner
        self.hidden, self.top_k = hidden, top_k
        self._set_placement(placement or ReplicatedPlacement.from_placement(group.placement))

    def _set_placement(self, placement: ReplicatedPlacement) -> None:
        if placement.ep_size != self.group.world:
            raise ValueError(f"MoE layer {self.moe_index}: placement over {placement.ep_size} ranks, the instance "
                             f"has {self.group.world}")
        self.placement = placement
        dev = self.group.device
        # physical slot p (ranks in order) -> its rank and its row there
        self.slot_rank = torch.tensor([r for r, xs in enumerate(placement.slots) for _ in xs], dtype=torch.long,
                                      device=dev)
        self.slot_local = torch.tensor([i for xs in placement.slots for i in range(len(xs))], dtype=torch.long,
                                       device=dev)
        self.replicated = placement.n_redundant > 0
        self.first_slot = torch.tensor([x[0] for x in placement.log2phy()], dtype=torch.long, device=dev)

    def physical_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """The physical slot each (token, chosen expert) goes to: the one copy, or one of the
        replicas (balanced, deterministic; offset by this rank)."""
        if not self.replicated:
            return self.first_slot[ids]
        return route_to_replicas(ids.cpu(), self.placement, offset=self.group.rank).to(ids.device)

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
        phys = self.physical_slots(ids)
        dest = self.slot_rank[phys]
        hit = torch.zeros(t, g.world, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        to_rank, tok = hit.t().nonzero(as_tuple=True)
        send_counts = hit.sum(0)
        mine = dest[tok] == to_rank[:, None]
        lid = torch.where(mine, self.slot_local[phys[tok]], -1)
        lw = torch.where(mine, w[tok].float(), 0.0)
        rb = row_bytes(h, k, g.dispatch_dtype)
        n_send = tok.shape[0]
        counts = g.start_counts(send_counts.cpu() if g.device.type == "cpu" else send_counts)
        send = encode_rows(x[tok], lid, lw, g.dispatch_dtype, g.buffer("dispatch_send", n_send * rb).view(n_send, rb))
        send_split = [int(n) for n in send_counts.tolist()]
        # The split sizes are waited for at once: with a pause here as well, the other microbatch's
        # turn during this one's dispatch would hold no compute (only its own split sizes), and the
        # dispatch would travel unhidden; paused at dispatch and combine, each all-to-all of one
        # microbatch travels while the other runs its attention or its experts.
        recv_split = g.wait_counts(counts)
        n_recv = sum(recv_split)
        recv = g.buffer("dispatch_recv", n_recv * rb).view(n_recv, rb)
        dispatch = g.start_all_to_all(recv, send, recv_split, send_split, "dispatch")
        g.dispatch_s += g.timed() - start
        # each pause lets the other microbatch (--microbatches 2) compute while this one's collective travels
        g.pause()
        start = g.timed()
        g.wait(dispatch)
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
        start = g.timed()
        elt = x.element_size()
        back = g.buffer("combine_recv", n_send * h * elt).view(x.dtype).view(n_send, h)
        combine = g.start_all_to_all(back, y, send_split, recv_split, "combine")
        g.combine_s += g.timed() - start
        g.pause()
        start = g.timed()
        g.wait(combine)
        g.combine_bytes += (n_recv - recv_split[g.rank]) * h * elt
        out = torch.zeros_like(x).index_add_(0, tok, back)
        g.combine_s += g.timed() - start
        return out

    def empty_forward(self) -> None:
        """This layer's part in a step where this rank has no tokens."""
        dev = self.group.device
        x = torch.zeros(0, self.hidden, dtype=self.experts_dtype, device=dev)
        self.forward(x, Routing(torch.zeros(0, self.top_k, dtype=torch.long, device=dev),
                                torch.zeros(0, self.top_k, device=dev)))

    @torch.inference_mode()
    def repartition(self, new: ReplicatedPlacement) -> int:
        """Switch this layer to ``new`` (every rank calls it at the same step boundary, with the
        same ``new``): each expert copy a rank gains comes from the lowest rank that held it, one
        ``all_to_all_single`` per stacked tensor of the experts (weights, INT8 scales, biases).
        Returns the copies this rank received."""
        old, g, me = self.placement, self.group, self.group.rank
        if new.n_experts != old.n_experts:
            raise ValueError(f"MoE layer {self.moe_index}: new placement has {new.n_experts} experts, the layer "
                             f"{old.n_experts}")
        if new == old:
            return 0
        holder = [min(r for r, xs in enumerate(old.slots) if e in xs) for e in range(old.n_experts)]
        # (destination, expert) transfers, in the same order on every rank
        gains = [(d, e) for d, xs in enumerate(new.slots) for e in xs if e not in old.slots[d]]
        send = [[e for d, e in gains if holder[e] == me and d == dst] for dst in range(g.world)]
        recv = [[e for d, e in gains if d == me and holder[e] == src] for src in range(g.world)]
        mine_old = {e: i for i, e in enumerate(old.slots[me])}
        send_rows = torch.tensor([mine_old[e] for xs in send for e in xs], dtype=torch.long)
        recv_order = [e for xs in recv for e in xs]
        got = {e: i for i, e in enumerate(recv_order)}
        ex = self.experts
        n_old = len(old.slots[me])
        tensors: list[tuple[str, torch.Tensor, bool]] = [(n, t, True) for n, t in ex.named_parameters(recurse=False)]
        tensors += [(name, t, False) for name, t in ex.named_buffers(recurse=False) if t is not None]
        for name, t, is_param in tensors:
            if not t.dim() or t.shape[0] != n_old:
                continue
            t = t.detach()
            row_bytes_ = math.prod(t.shape[1:]) * t.element_size()  # rows travel as raw bytes (any dtype, any backend)
            inp = t[send_rows.to(t.device)].contiguous().view(-1).view(torch.uint8).view(len(send_rows), row_bytes_)
            out = torch.empty((len(recv_order), row_bytes_), dtype=torch.uint8, device=t.device)
            g.all_to_all(out, inp, [len(x) for x in recv], [len(x) for x in send], f"moving experts ({name})")
            moved = out.view(-1).view(t.dtype).view(len(recv_order), *t.shape[1:])
            rows = [t[mine_old[e]] if e in mine_old else moved[got[e]] for e in new.slots[me]]
            fresh = (torch.stack(rows) if rows else t[:0].clone()).contiguous()
            setattr(ex, name, nn.Parameter(fresh, requires_grad=False) if is_param else fresh)
        ex.n_experts = len(new.slots[me])
        self.inner = _inner_backend(ex, self.inner.name)
        self._set_placement(new)
        return len(recv_order)


    @property
    def experts_dtype(self) -> torch.dtype:
        """The dtype of the activations this layer sees (its experts' float dtype, else float32)."""
        for p in self.experts.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def apply_placements(group: EPGroup, tables: list[list[list[int]]]) -> int:
    """Switch every MoE layer to its table (``tables[layer][rank]``: the experts in that rank's
    slots), moving expert weights between the ranks; every rank calls it at the same step
    boundary. Returns the expert copies this rank received."""
    if len(tables) != len(group.backends):
        raise ValueError(f"{len(tables)} placement tables for {len(group.backends)} MoE layers")
    new = [ReplicatedPlacement.from_table(t, b.placement.n_experts) for b, t in zip(group.backends, tables)]
    moved = sum(b.repartition(p) for b, p in zip(group.backends, new))
    group.rebalances += 1
    group.experts_received += moved
    return moved


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


def _inner_backend(ex: Experts, name: str) -> ExpertsBackend:
    try:
        return EXPERTS_BACKENDS[name](ex)
    except BackendUnavailable:
        return EXPERTS_BACKENDS[ex.fallback_backend](ex)


def enable_expert_parallel(model: nn.Module, group: EPGroup,
                           placements: list[ReplicatedPlacement] | None = None) -> int:
    """Make every MoE layer of ``model`` (main layers; MTP modules are not run under EP) keep only
    this rank's expert slots and compute through :class:`ExpertParallelExperts`. ``placements``:
    one per MoE layer (default: ``group.placement`` for all). Returns the number of MoE layers.
    Call after the model's compute backends are chosen."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.layers: not a DeepSeek causal LM")
    moes = [(block, block.mlp) for block in layers if isinstance(getattr(block, "mlp", None), MoE)]
    if placements is None:
        placements = [ReplicatedPlacement.from_placement(group.placement)] * len(moes)
    if len(placements) != len(moes):
        raise ValueError(f"{len(placements)} placements for the model's {len(moes)} MoE layers")
    group.backends.clear()
    for (block, moe), placement in zip(moes, placements):
        if moe.gate.n_experts != placement.n_experts:
            raise ValueError(f"placement is for {placement.n_experts} experts; the model's MoE layers have "
                             f"{moe.gate.n_experts}")
        ex = moe.experts
        inner_name = ex.impl.name
        shard_experts(ex, list(placement.slots[group.rank]))
        inner = _inner_backend(ex, inner_name)
        block.native = None  # the one-call native layer would compute every expert locally
        ex.impl = ExpertParallelExperts(ex, group, len(group.backends), inner, moe.gate.weight.shape[1],
                                        moe.gate.top_k, placement)
        group.backends.append(ex.impl)
    log.info("EP rank %d/%d: %d MoE layers, slots %s, dispatch %s", group.rank, group.world, len(group.backends),
             [list(p.slots[group.rank]) for p in placements[:1]], group.dispatch_dtype)
    return len(group.backends)


def enable_microbatches(model: nn.Module, group: EPGroup, n: int) -> None:
    """``--microbatches n``: with 2, every forward pass of ``model`` (and every idle pass of this
    rank) runs as two microbatches taking turns at the dispatch/combine collectives
    (:mod:`matrixinfer.parallel.microbatch`); 1 leaves the model as it is. Every rank of the
    instance must use the same ``n`` (their collectives pair up microbatch by microbatch)."""
    from matrixinfer.parallel.microbatch import MicrobatchForward, TurnScheduler

    if n == 1:
        return
    if n != 2:
        raise ValueError(f"--microbatches {n}: 1 or 2 are supported")
    if group.turns is not None:
        raise RuntimeError(f"EP rank {group.rank}: microbatches are enabled already")
    group.turns = TurnScheduler(n)
    # an instance attribute shadows the class's forward: the runner calls the model as before
    model.forward = MicrobatchForward(model, group.turns, group.empty_pass)
