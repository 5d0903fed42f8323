"""DP attention: every rank of an EP instance runs its own scheduler and paged KV cache over its
own requests, and all ranks step in lockstep so that each MoE layer's dispatch and combine find
every rank there (a rank without work runs an empty batch, as SGLang's DP attention does).

Rank 0 is the instance's face (:class:`DPEngine`, an :class:`LLMEngine` for the API server, the
worker and :class:`~matrixinfer.engine.async_engine.AsyncEngine`). It spreads new requests over
the ranks by load (in the prefill/decode roles, whose KV handoff is bound to rank 0's cache, every
request stays on rank 0 and the others only hold experts). Before every step it broadcasts a
:class:`StepPlan` (new requests, aborts, whether a forward pass runs); after the step every rank
sends a :class:`RankReport` (outputs, stats, EP metrics) back. The other ranks run :func:`follow`.
Without work, rank 0 still sends a heartbeat plan every ``heartbeat`` seconds, so that a waiting
rank's collective never times out while one that died is noticed within ``ep_timeout``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import msgspec

from matrixinfer.config import EngineConfig
from matrixinfer.engine.commands import AddRequest
from matrixinfer.engine.errors import RequestError
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.outputs import EngineStats, FinishReason, RequestOutput, sum_stats
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.tokenizer import Tokenizer
from matrixinfer.parallel.group import EPGroup, RankFailure
from matrixinfer.parallel.messages import (
    ENCODER,
    PLAN_DECODER,
    REPORT_DECODER,
    EPMetrics,
    RankAdd,
    RankReport,
    StepPlan,
)
from matrixinfer.parallel.placement import load_imbalance

log = logging.getLogger(__name__)


def ep_metrics(group: EPGroup) -> EPMetrics:
    return EPMetrics(rank=group.rank, experts=group.placement.experts_of(group.rank), tokens=group.tokens,
                     passes=group.passes, idle_passes=group.idle_passes, dispatch_bytes=group.dispatch_bytes,
                     combine_bytes=group.combine_bytes, dispatch_seconds=group.dispatch_s,
                     combine_seconds=group.combine_s, expert_tokens=group.expert_tokens.tolist())


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
            except RequestError as e:
                outputs.append(RequestOutput(request_id=r.request_id, finished=True,
                                             finish_reason=FinishReason.ABORT, error=str(e)))
        for rid in plan.aborts:
            engine.abort(rid)
        if plan.run:
            outputs += run_step(engine.step, group)
        report = RankReport(outputs, engine.stats(), engine.has_work(), ep_metrics(group))
        group.gather_bytes(ENCODER.encode(report))


class DPEngine(LLMEngine):
    """Rank 0 of an EP instance: an :class:`LLMEngine` over its own requests that also drives the
    other ranks (see the module docstring). Its outputs and stats are the whole instance's."""

    def __init__(self, cfg: EngineConfig, group: EPGroup, model: DeepseekForCausalLM,
                 tokenizer: Tokenizer | None = None, connector: KVConnector | None = None,
                 heartbeat: float = 1.0) -> None:
        super().__init__(cfg, model=model, tokenizer=tokenizer, connector=connector)
        self.group = group
        # A KV connector (prefill handoff, EMS) is bound to this rank's cache: with one, every request
        # stays here and the other ranks only hold experts (EP MoE without DP attention).
        self.spread = connector is None
        self.heartbeat = min(heartbeat, group.timeout_s / 4)
        self._owner: dict[str, int] = {}  # request id -> rank, for requests on other ranks
        self._adds: list[RankAdd] = []
        self._aborts: list[str] = []
        self._sent: list[int] = [0] * group.world  # requests given to each rank since its last report
        self._reports: list[RankReport | None] = [None] * group.world
        self._last = time.monotonic()
        self.closed = False

    # -- requests ------------------------------------------------------------------------------
    def _load(self, rank: int) -> tuple[int, int]:
        if rank == 0:
            return len(self.running) + len(self.waiting), 0
        rep = self._reports[rank]
        if rep is None:
            return self._sent[rank], 0
        return rep.stats.running + rep.stats.waiting + self._sent[rank], rep.stats.queued_tokens

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request on the least loaded rank (requests, then queued tokens)."""
        if request_id in self._owner:
            raise RequestError(f"request id {request_id!r} is already in use")
        rank = min(range(self.group.world), key=lambda r: (*self._load(r), r)) if self.spread else 0
        if rank == 0:
            super().add_request(request_id, prompt_ids, params)
            return
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_ids)
        self._owner[request_id] = rank
        self._sent[rank] += 1
        self._adds.append(RankAdd(rank, AddRequest(request_id, list(prompt_ids), params)))

    def abort(self, request_id: str) -> bool:
        if request_id not in self._owner:
            return super().abort(request_id)
        pending = [a for a in self._adds if a.request.request_id == request_id]
        if pending:
            self._adds.remove(pending[0])
            self._sent[pending[0].rank] -= 1
        else:
            self._aborts.append(request_id)
        del self._owner[request_id]
        return True

    def _remote_work(self) -> bool:
        return any(r is not None and r.has_work for r in self._reports[1:])

    def has_work(self) -> bool:
        return (super().has_work() or bool(self._adds or self._aborts) or self._remote_work()
                or time.monotonic() - self._last >= self.heartbeat)

    # -- one lockstep step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Broadcast the plan, run this rank's batch with the others, collect their reports. A
        rank failure raises :class:`RankFailure` (the instance is dead; the caller fails its requests)."""
        if self.closed:
            raise RankFailure("this EP instance is closed")
        run = LLMEngine.has_work(self) or bool(self._adds) or self._remote_work()
        plan = StepPlan(self._adds, self._aborts, run=run)
        self._adds, self._aborts = [], []
        self._sent = [0] * self.group.world
        self._last = time.monotonic()
        self.group.broadcast_bytes(ENCODER.encode(plan))
        outputs = run_step(lambda: LLMEngine.step(self), self.group) if run else []
        for rank, data in enumerate(self.group.gather_bytes(b"")):
            if rank == 0:
                continue
            rep = REPORT_DECODER.decode(data)
            self._reports[rank] = rep
            for out in rep.outputs:
                if out.request_id not in self._owner:  # aborted here while that rank stepped
                    continue
                outputs.append(out)
                if out.finished or out.handed_off:
                    del self._owner[out.request_id]
        return outputs

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
        return msgspec.structs.replace(total, steps=mine.steps)

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
        return {
            "ep": self.group.world,
            "dispatch_dtype": self.group.dispatch_dtype,
            "placement": self.group.placement.as_table(),
            "ranks": [dict(msgspec.to_builtins(m), running=s.running, waiting=s.waiting,
                           generation_tokens=s.generation_tokens, prompt_tokens=s.prompt_tokens)
                      for m, s in zip(ranks, stats)],
            "expert_tokens": total,
            "imbalance": load_imbalance(self.group.placement, total),
        }

    def load_snapshot_json(self) -> str:
        return json.dumps(self.load_snapshot(), indent=1)
