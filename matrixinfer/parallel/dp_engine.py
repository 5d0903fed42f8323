"""DP attention: every rank of an EP instance runs its own scheduler and paged KV cache over its
own requests, and all ranks step in lockstep so that each MoE layer's dispatch and combine find
every rank there (a rank without work runs an empty batch, as SGLang's DP attention does).

Rank 0 is the instance's face (:class:`DPEngine`, an :class:`LLMEngine` for the API server, the
worker and :class:`~matrixinfer.engine.async_engine.AsyncEngine`). It spreads new requests over
the ranks by load. Before every step it broadcasts a :class:`StepPlan` (new requests, aborts,
whether a forward pass runs); after the step every rank sends a :class:`RankReport` (outputs,
stats, EP metrics) back. The other ranks run :func:`follow`.

In the prefill/decode roles rank 0 alone talks to the router and holds the KV port, and the KV
handoff goes over the same control channel: a prefill rank that computed a request hands its KV
back in its report (:class:`KVHandoff`, taken by :class:`HandoffCollector`) and rank 0's
``KVSender`` sends it on (:meth:`DPEngine.hand_off_from_ranks`); on a decode instance the KV lands
in rank 0's reservation, and :meth:`DPEngine.attach` moves a request to a less loaded rank in the
next plan (:class:`RankAttach`), whose engine reserves, writes and attaches it. With the EMS
context cache, every rank has its own EMS connector (the launcher gives ranks >= 1 the pool's
addresses and the deployment secret in their environment), so requests spread in the same way.

Live expert rebalance: every ``eplb_interval`` steps rank 0 plans each MoE layer's placement from
the expert load routed so far, older intervals decayed (:data:`EPLB_DECAY`; a plan from one short
interval's few tokens fits noise), with :func:`~matrixinfer.parallel.eplb.plan_incremental` (few
expert moves to a balance target, ``redundant_experts`` extra slots) and, when a layer changes,
puts the new tables in the next :class:`StepPlan`; every rank switches before that step
(:func:`~matrixinfer.parallel.ep_moe.apply_placements`), so the switch is atomic between steps
and requests keep running.
Without work, rank 0 still sends a heartbeat plan every ``heartbeat`` seconds, so that a waiting
rank's collective never times out while one that died is noticed within ``ep_timeout``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Sequence_

import msgspec
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.commands import AddRequest
from matrixinfer.engine.errors import RequestError
from matrixinfer.engine.kv_connector import KVConnector, MultiConnector
from matrixinfer.engine.llm_engine import LLMEngine, _Detok
from matrixinfer.engine.outputs import EngineStats, FinishReason, RequestOutput, sum_stats
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.engine.sequence import Sequence
from matrixinfer.engine.speculative import last_hidden
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.tokenizer import Tokenizer
from matrixinfer.parallel.ep_moe import apply_placements
from matrixinfer.parallel.eplb import ReplicatedPlacement, plan_incremental
from matrixinfer.parallel.group import EPGroup, RankFailure
from matrixinfer.parallel.messages import (
    ENCODER,
    PLAN_DECODER,
    REPORT_DECODER,
    EPMetrics,
    KVHandoff,
    RankAdd,
    RankAttach,
    RankReport,
    StepPlan,
)
from matrixinfer.parallel.placement import load_imbalance

log = logging.getLogger(__name__)
EPLB_DECAY = 0.75  # weight of the load before the last interval, per interval, in a live re-plan
EPLB_MIN_PER_EXPERT = 32  # routed tokens per expert (decayed) before the first live re-plan


def ep_metrics(group: EPGroup) -> EPMetrics:
    return EPMetrics(rank=group.rank, experts=group.slots_of(group.rank), tokens=group.tokens,
                     passes=group.passes, idle_passes=group.idle_passes, dispatch_bytes=group.dispatch_bytes,
                     combine_bytes=group.combine_bytes, dispatch_seconds=group.dispatch_s,
                     combine_seconds=group.combine_s, expert_tokens=group.expert_tokens.tolist(),
                     rebalances=group.rebalances, experts_received=group.experts_received)


def kv_bytes(kv: torch.Tensor) -> tuple[str, list[int], bytes]:
    """A CPU KV tensor as (dtype name, shape, raw bytes) for the control channel."""
    raw = kv.contiguous().view(torch.uint8) if kv.dtype != torch.uint8 else kv.contiguous()
    return str(kv.dtype).removeprefix("torch."), list(kv.shape), raw.numpy().tobytes()


def kv_tensor(dtype: str, shape: list[int], data: bytes) -> torch.Tensor:
    """The inverse of :func:`kv_bytes`."""
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).view(*shape)


class HandoffCollector(KVConnector):
    """The connector of a rank other than 0: a request rank 0 marked as a prefill handoff leaves
    after its first token, its KV read out into a :class:`KVHandoff` for the next report."""

    def __init__(self) -> None:
        self.wanted: set[str] = set()
        self.ready: list[KVHandoff] = []

    def take_over(self, seq: Sequence, token: int, logprob: float | None) -> bool:
        if seq.request_id not in self.wanted:
            return False
        self.wanted.discard(seq.request_id)
        dtype, shape, data = kv_bytes(self.cache.read_tokens(seq.block_table, len(seq.prompt_ids)))
        self.ready.append(KVHandoff(seq.request_id, token, logprob, seq.num_cached_tokens,
                                    self.sampler.export_state(seq.request_id), last_hidden(seq), dtype, shape, data,
                                    seq.top_logprobs[0] if seq.top_logprobs else []))
        return True

    def request_finished(self, seq: Sequence) -> None:
        self.wanted.discard(seq.request_id)


def _find_collector(engine: LLMEngine) -> HandoffCollector | None:
    c = engine.connector
    if isinstance(c, MultiConnector):
        c = next((x for x in c.connectors if isinstance(x, HandoffCollector)), None)
    return c if isinstance(c, HandoffCollector) else None


def _collector(engine: LLMEngine) -> HandoffCollector:
    """This rank's :class:`HandoffCollector`, bound on the first prefill handoff (a rank of another
    role runs without one); beside the rank's EMS connector when it has one (the EMS connector
    first: it stores the prompt's blocks before the request leaves)."""
    found = _find_collector(engine)
    if found is not None:
        return found
    collector = HandoffCollector()
    engine.connector = collector if engine.connector is None else MultiConnector([engine.connector, collector])
    engine.connector.bind(engine.runner.kv_cache, engine.sampler)
    return collector


def _attach_here(engine: LLMEngine, a: RankAttach) -> None:
    """Continue a decode request moved here by rank 0 (reserve, write its KV, attach); the first
    token's output was streamed by rank 0, so the one :meth:`LLMEngine.attach` returns is dropped."""
    r = a.request
    if engine.reserve(r.request_id, len(r.prompt_ids), timeout=3600.0) is None:
        raise RequestError(f"request {r.request_id!r}: EP rank has no free KV blocks for the moved request")
    try:
        engine.write_reserved(r.request_id, 0, kv_tensor(a.dtype, a.shape, a.kv))
        engine.sampler.import_state(r.request_id, a.sampler_state, engine.runner.device)
        engine.attach(r.request_id, r.prompt_ids, a.first_token, a.first_logprob, r.params, a.num_cached, a.hidden)
    except BaseException:
        engine.release_reservation(r.request_id)
        engine.sampler.forget(r.request_id)
        raise


def run_step(step: Callable[[], list[RequestOutput]], group: EPGroup) -> list[RequestOutput]:
    """This rank's part of a lockstep step: ``step`` (its engine's own batch), or an empty batch
    through every MoE layer where that ran no forward pass."""
    before = group.passes
    outputs = step()
    if group.broken is not None:  # step() fails the batch on any error; a collective's error is the instance's
        raise RankFailure(f"EP rank {group.rank}: {group.broken}")
    if group.passes == before:
        group.idle_pass()
    return outputs


def follow(engine: LLMEngine, group: EPGroup) -> None:
    """The loop of a rank other than 0: apply rank 0's plan, step, report; until told to stop.
    Raises :class:`RankFailure` when rank 0 or another rank is gone."""
    while True:
        plan = PLAN_DECODER.decode(group.broadcast_bytes(None))
        if plan.stop:
            return
        outputs: list[RequestOutput] = []
        for add in plan.adds:
            if add.rank != group.rank:
                continue
            r = add.request
            try:
                engine.add_request(r.request_id, r.prompt_ids, r.params)
                if add.handoff:
                    _collector(engine).wanted.add(r.request_id)
            except RequestError as e:
                outputs.append(RequestOutput(request_id=r.request_id, finished=True,
                                             finish_reason=FinishReason.ABORT, error=str(e)))
        for att in plan.attaches:
            if att.rank != group.rank:
                continue
            try:
                _attach_here(engine, att)
            except (RequestError, ValueError) as e:
                outputs.append(RequestOutput(request_id=att.request.request_id, finished=True,
                                             finish_reason=FinishReason.ABORT, error=str(e)))
        for rid in plan.aborts:
            engine.abort(rid)
        if plan.placements is not None:
            apply_placements(group, plan.placements)
        if plan.run:
            outputs += run_step(engine.step, group)
        handoffs: list[KVHandoff] = []
        collector = _find_collector(engine)
        if collector is not None:
            handoffs, collector.ready = collector.ready, []
        report = RankReport(outputs, engine.stats(), engine.has_work(), ep_metrics(group), handoffs)
        group.gather_bytes(ENCODER.encode(report))


class DPEngine(LLMEngine):
    """Rank 0 of an EP instance: an :class:`LLMEngine` over its own requests that also drives the
    other ranks (see the module docstring). Its outputs and stats are the whole instance's."""

    def __init__(self, cfg: EngineConfig, group: EPGroup, model: DeepseekForCausalLM,
                 tokenizer: Tokenizer | None = None, connector: KVConnector | None = None,
                 heartbeat: float = 1.0, ranks_have_connector: bool = False) -> None:
        super().__init__(cfg, model=model, tokenizer=tokenizer, connector=connector)
        self.group = group
        # A KV connector (EMS) is bound to this rank's cache: unless the other ranks have their own
        # (ranks_have_connector), every request stays here and the other ranks only hold experts. A
        # decode instance spreads at attach; a prefill instance's handoff spreads via hand_off_from_ranks.
        self.spread = connector is None or ranks_have_connector
        # live rebalance (eplb_interval steps apart; 0: never)
        self.eplb_interval, self.eplb_target = cfg.eplb_interval, cfg.eplb_target
        self._steps_since_plan = 0
        self._window_base: list[list[int]] = []  # expert_tokens totals when the last plan was made
        self._expert_load: list[list[float]] = []  # per layer, per expert: routed tokens, older intervals decayed
        self._placements: list[list[list[int]]] | None = None  # tables for the next step plan
        self._send_handoff: Callable[[KVHandoff], None] | None = None
        self._attaches: list[RankAttach] = []
        self._blocks_sent: list[int] = [0] * group.world  # KV blocks of attaches sent since the last report
        self.remote_requests = 0  # requests given to the other ranks (adds and attaches)
        self.heartbeat = min(heartbeat, group.timeout_s / 4)
        self._turn = 0  # the rank that wins the next tie of loads
        self._owner: dict[str, int] = {}  # request id -> rank, for requests on other ranks
        self._adds: list[RankAdd] = []
        self._aborts: list[str] = []
        self._sent: list[int] = [0] * group.world  # requests given to each rank since its last report
        self._reports: list[RankReport | None] = [None] * group.world
        self._last = time.monotonic()
        self.closed = False

    # -- requests ------------------------------------------------------------------------------
    def hand_off_from_ranks(self, send: Callable[[KVHandoff], None]) -> None:
        """A prefill instance whose only connector is the KV handoff: spread its requests over the
        ranks anyway; a request prefilled on another rank comes back as a :class:`KVHandoff` in
        that rank's report and is passed to ``send`` (on the engine's thread)."""
        self.spread = True
        self._send_handoff = send

    def _load(self, rank: int) -> tuple[int, int]:
        if rank == 0:
            return len(self.running) + len(self.waiting), 0
        rep = self._reports[rank]
        if rep is None:
            return self._sent[rank], 0
        return rep.stats.running + rep.stats.waiting + self._sent[rank], rep.stats.queued_tokens

    def _pick(self, ranks: Sequence_[int]) -> int:
        """The least loaded of ``ranks`` (requests, then queued tokens); ties go round-robin, so that
        requests arriving one at a time on an idle instance still spread over its ranks."""
        world = self.group.world
        rank = min(ranks, key=lambda r: (*self._load(r), (r - self._turn) % world))
        self._turn = (rank + 1) % world
        return rank

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request on the least loaded rank (see :meth:`_pick`)."""
        if request_id in self._owner:
            raise RequestError(f"request id {request_id!r} is already in use")
        rank = self._pick(range(self.group.world)) if self.spread else 0
        if rank == 0:
            super().add_request(request_id, prompt_ids, params)
            return
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_ids)
        self._owner[request_id] = rank
        self._sent[rank] += 1
        self.remote_requests += 1
        self._adds.append(RankAdd(rank, AddRequest(request_id, list(prompt_ids), params),
                                  handoff=self._send_handoff is not None))

    def _attach_rank(self, num_tokens: int) -> int:
        """The least loaded rank whose last report leaves room for ``num_tokens`` of KV (rank 0
        already holds the reservation)."""
        need = self.blocks.blocks_needed(num_tokens + 1)
        fits = [0]
        for r in range(1, self.group.world):
            rep = self._reports[r]
            if rep is not None and rep.stats.kv_total - rep.stats.kv_used - self._blocks_sent[r] >= need:
                fits.append(r)
        return self._pick(fits)

    def attach(self, request_id: str, prompt_ids: list[int], first_token: int, first_logprob: float | None,
               params: SamplingParams, num_cached: int = 0, hidden: bytes = b"") -> RequestOutput:
        """A decode instance's request whose KV arrived in this rank's reservation: attach it here, or
        on the least loaded rank with room (its KV and sampler state go there in the next plan; the
        first token's output is made here, as :meth:`LLMEngine.attach` makes it)."""
        rank = self._attach_rank(len(prompt_ids)) if self.spread else 0
        if rank == 0:
            return super().attach(request_id, prompt_ids, first_token, first_logprob, params, num_cached, hidden)
        width = self.model.config.hidden_size * 4
        if hidden and len(hidden) != width:
            raise RequestError(f"request {request_id!r}: the handed-over hidden state has {len(hidden)} bytes; "
                               f"this model's is {width} (hidden_size {width // 4} float32)")
        with self._kv_lock:
            held = self._reservations.get(request_id)
            if held is None:
                raise RequestError(f"request {request_id!r} holds no reservation (aborted or expired)")
            kv = self.runner.kv_cache.read_tokens(held[0].block_table, len(prompt_ids))
        self.release_reservation(request_id)
        state = self.sampler.export_state(request_id)
        self.sampler.forget(request_id)
        dtype, shape, data = kv_bytes(kv)
        self._owner[request_id] = rank
        self._sent[rank] += 1
        self._blocks_sent[rank] += self.blocks.blocks_needed(len(prompt_ids) + 1)
        self.remote_requests += 1
        self._attaches.append(RankAttach(rank, AddRequest(request_id, list(prompt_ids), params), first_token,
                                         first_logprob, num_cached, state, hidden, dtype, shape, data))
        detok = _Detok(self.tokenizer, params.stop)
        detok.push(first_token)
        logprobs = [first_logprob] if params.logprobs and first_logprob is not None else []
        return RequestOutput(request_id=request_id, token_ids=[first_token], logprobs=logprobs,
                             text=detok.delta(final=False), num_prompt_tokens=len(prompt_ids), num_output_tokens=1,
                             num_cached_tokens=num_cached)

    def abort(self, request_id: str) -> bool:
        if request_id not in self._owner:
            return super().abort(request_id)
        pending = [a for a in self._adds if a.request.request_id == request_id]
        moving = [a for a in self._attaches if a.request.request_id == request_id]
        if pending:
            self._adds.remove(pending[0])
            self._sent[pending[0].rank] -= 1
        elif moving:
            self._attaches.remove(moving[0])
            self._sent[moving[0].rank] -= 1
        else:
            self._aborts.append(request_id)
        del self._owner[request_id]
        return True

    def _remote_work(self) -> bool:
        return any(r is not None and r.has_work for r in self._reports[1:])

    def has_work(self) -> bool:
        return (super().has_work() or bool(self._adds or self._attaches or self._aborts) or self._remote_work()
                or time.monotonic() - self._last >= self.heartbeat)

    # -- one lockstep step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Broadcast the plan, run this rank's batch with the others, collect their reports. A
        rank failure raises :class:`RankFailure` (the instance is dead; the caller fails its requests)."""
        if self.closed:
            raise RankFailure("this EP instance is closed")
        run = LLMEngine.has_work(self) or bool(self._adds or self._attaches) or self._remote_work()
        if run and self.eplb_interval:
            self._steps_since_plan += 1
            if self._steps_since_plan >= self.eplb_interval:
                self._steps_since_plan = 0
                self._plan_rebalance()
        plan = StepPlan(self._adds, self._attaches, self._aborts, run=run, placements=self._placements)
        self._adds, self._attaches, self._aborts, self._placements = [], [], [], None
        self._sent = [0] * self.group.world
        self._blocks_sent = [0] * self.group.world
        self._last = time.monotonic()
        self.group.broadcast_bytes(ENCODER.encode(plan))
        if plan.placements is not None:
            moved = apply_placements(self.group, plan.placements)
            log.info("EP instance: placement switched (rebalance %d; rank 0 received %d expert copies)",
                     self.group.rebalances, moved)
        outputs = run_step(lambda: LLMEngine.step(self), self.group) if run else []
        for rank, data in enumerate(self.group.gather_bytes(b"")):
            if rank == 0:
                continue
            rep = REPORT_DECODER.decode(data)
            self._reports[rank] = rep
            for h in rep.handoffs:  # before the outputs: their handed_off ends the request's ownership
                if h.request_id in self._owner and self._send_handoff is not None:
                    self._send_handoff(h)
            for out in rep.outputs:
                if out.request_id not in self._owner:  # aborted here while that rank stepped
                    continue
                outputs.append(out)
                if out.finished or out.handed_off:
                    del self._owner[out.request_id]
        return outputs

    # -- expert placement ------------------------------------------------------------------------
    def placements(self) -> list[list[list[int]]]:
        """The current placement of every MoE layer (``[moe_layer][rank]``: experts in its slots)."""
        return [b.placement.as_table() for b in self.group.backends]

    def rebalance_to(self, tables: list[list[list[int]]]) -> None:
        """Switch to ``tables`` at the next step boundary (all ranks at once, weights moved over the
        collective backend). Checked here, so that a bad table never reaches the ranks."""
        if len(tables) != len(self.group.backends):
            raise ValueError(f"{len(tables)} placement tables for {len(self.group.backends)} MoE layers")
        for b, t in zip(self.group.backends, tables):
            p = ReplicatedPlacement.from_table(t, b.placement.n_experts)
            if p.ep_size != self.group.world:
                raise ValueError(f"placement over {p.ep_size} ranks; the instance has {self.group.world}")
        self._placements = [[list(map(int, r)) for r in t] for t in tables]

    def _expert_totals(self) -> list[list[int]]:
        ranks = [ep_metrics(self.group)] + [r.ep for r in self._reports[1:] if r is not None]
        layers = len(self.group.backends)
        n = self.group.placement.n_experts
        return [[sum(m.expert_tokens[i][e] for m in ranks if i < len(m.expert_tokens)) for e in range(n)]
                for i in range(layers)]

    def _plan_rebalance(self) -> None:
        """Plan each MoE layer from its decayed load; queue the tables if one moves."""
        totals = self._expert_totals()
        base = self._window_base or [[0] * len(t) for t in totals]
        prev = self._expert_load or [[0.0] * len(t) for t in totals]
        self._window_base = totals
        self._expert_load = [[EPLB_DECAY * x + (a - c) for x, a, c in zip(p, now, before)]
                      for p, now, before in zip(prev, totals, base)]
        tables, changed = [], False
        for b, window in zip(self.group.backends, self._expert_load):
            if sum(window) < EPLB_MIN_PER_EXPERT * len(window):  # too few tokens yet to tell hot from cold
                tables.append(b.placement.as_table())
                continue
            try:
                plan = plan_incremental(window, b.placement, b.placement.n_redundant, self.eplb_target)
            except ValueError as e:  # a placement the policy cannot re-plan: keep it (never fail the step)
                log.warning("EP rebalance of MoE layer %d skipped: %s", b.moe_index, e)
                tables.append(b.placement.as_table())
                continue
            if plan.moves and plan.balance_after < plan.balance_before:
                changed = True
                tables.append(plan.placement.as_table())
                log.info("EP rebalance: MoE layer %d balance %.3f -> %.3f, %d expert copies move", b.moe_index,
                         plan.balance_before, plan.balance_after, plan.moves)
            else:
                tables.append(b.placement.as_table())
        if changed:
            self._placements = tables

    def close(self) -> None:
        """Tell the other ranks to stop, then leave the group (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.group.broken is None:
            try:
                self.group.broadcast_bytes(ENCODER.encode(StepPlan(stop=True)))
            except RankFailure:
                log.warning("EP instance: a rank was already gone at shutdown")
        self.group.close()

    # -- what the instance reports ---------------------------------------------------------------
    def stats(self) -> EngineStats:
        mine = LLMEngine.stats(self)
        others = [r.stats for r in self._reports[1:] if r is not None]
        total = sum_stats([mine, *others])
        return msgspec.structs.replace(total, steps=mine.steps, ep_remote_requests=self.remote_requests)

    def load_snapshot(self) -> dict:
        """The instance's per-rank and per-expert load (the JSON behind ``/ep/load`` and
        ``matrixinfer ep-load``): the placement table, each rank's :class:`EPMetrics` and its
        requests, ``expert_tokens[moe_layer][expert]`` summed over the ranks, and their ``imbalance``
        (busiest rank over the mean: the simulator's ``DecodeConfig.imbalance``)."""
        ranks = [ep_metrics(self.group)] + [r.ep for r in self._reports[1:] if r is not None]
        stats = [LLMEngine.stats(self)] + [r.stats for r in self._reports[1:] if r is not None]
        layers = max((len(m.expert_tokens) for m in ranks), default=0)
        n = self.group.placement.n_experts
        total = [[sum(m.expert_tokens[i][e] for m in ranks if i < len(m.expert_tokens)) for e in range(n)]
                 for i in range(layers)]
        current = [b.placement for b in self.group.backends]
        one_copy = ReplicatedPlacement.from_placement(self.group.placement)
        if all(p == one_copy for p in current):
            imbalance = load_imbalance(self.group.placement, total)
        else:  # replicas or re-placed layers: each layer's counts under its current placement
            ratios = [p.balance([float(x) for x in t]) for p, t in zip(current, total) if sum(t)]
            imbalance = sum(ratios) / len(ratios) if ratios else 1.0
        return {
            "ep": self.group.world,
            "dispatch_dtype": self.group.dispatch_dtype,
            "placement": current[0].as_table() if current else self.group.placement.as_table(),
            "layers": [{"slots": p.as_table()} for p in current],
            "redundant": current[0].n_redundant if current else 0,
            "rebalances": self.group.rebalances,
            "ranks": [dict(msgspec.to_builtins(m), running=s.running, waiting=s.waiting,
                           generation_tokens=s.generation_tokens, prompt_tokens=s.prompt_tokens)
                      for m, s in zip(ranks, stats)],
            "expert_tokens": total,
            "imbalance": imbalance,
        }

    def load_snapshot_json(self) -> str:
        return json.dumps(self.load_snapshot(), indent=1)
