"""Request-level simulation of this machine's engine, colocated or as a P/D pair (pure).

The simulated engine runs the engine's own scheduling policy (:func:`matrixinfer.engine.scheduler.schedule`,
the same continuous batching with chunked prefill, token budget, sequence cap and preemption), so
the simulated and the real scheduler cannot drift apart. Each step's duration comes from
:class:`~matrixinfer.sim.local_cost.LocalCostModel`; a step's new tokens appear at its end.

Clients behave as ``matrixinfer bench`` does: Poisson send times (the same seeds give the same
requests) or a fixed number in flight (``max_concurrency``: the next is sent when the client has
the last one's end), TTFT from send to first token, TPOT ``(e2e - TTFT) / (output - 1)``,
throughput = output tokens / duration. The serving stack's measured latency at the load the
request finds (the requests in flight) splits into a way in (``api_in``: the colocated engine
admits the request that long after its send) and a way out (the rest of ``api_request``: the
client has the first token and the last that long after the engine's step gave them).

P/D, as the router runs it: the decode instance first reserves blocks for the request (a worker
reads its messages between steps, so a busy decode instance answers when its current step ends),
then the prefill instance computes the prompt and samples the first token, then the prompt's KV
goes to the decode instance (``transfer_s(prompt_len)``), which attaches it, again between its
steps, and decodes the rest. The first token reaches the client from the decode instance when it
attaches the KV (``PrefillWorker.emit`` hands the request off without streaming it), so TTFT
includes the transfer and the wait for the decode instance's step to end. The two instances step
independently.

An instance that had no work since ``idle_since`` starts its next step after that idle gap, which
the cost model charges as a wake-up (``idle_wake``); before the first request it has been idle
since before the run (the bench's warm-up), longer than any profiled gap. Likewise a request sent
when no request was in flight finds the serving stack idle since the last one finished, and its
TTFT gets the stack's wake-up (``api_wake``).
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from matrixinfer.engine.scheduler import Budget, SeqView, schedule
from matrixinfer.sim.local_cost import LocalCostModel
from matrixinfer.sim.local_ops import StepShape


@dataclass(frozen=True)
class SimRequest:
    """One request: when the client may send it (Poisson offset), prompt and output lengths."""

    rid: int
    offset: float
    prompt_len: int
    output_len: int


@dataclass
class _Seq:
    req: SimRequest
    computed: int = 0
    generated: int = 0
    blocks: int = 0
    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    stop_after: int = 0  # tokens this instance generates before the sequence leaves it
    idle_found: float = 0.0  # how long the serving stack had been idle when the request was sent
    way_out: float = 0.0  # the stack's way out to the client, at the load the request found

    @property
    def tokens(self) -> int:
        return self.req.prompt_len + self.generated


@dataclass
class SimResult:
    """Per-request times and the run's aggregate figures (the same definitions as the bench)."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    output_tokens: int = 0
    duration: float = 0.0
    steps: int = 0
    busy_seconds: float = 0.0  # the engines' simulated step time, summed

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration if self.duration > 0 else 0.0

    @property
    def mean_ttft(self) -> float:
        return float(np.mean(self.ttft)) if self.ttft else 0.0

    @property
    def mean_tpot(self) -> float:
        return float(np.mean(self.tpot)) if self.tpot else 0.0


class SimEngine:
    """One engine instance: its waiting and running sequences, blocks and step costs."""

    def __init__(self, cost: LocalCostModel, budget: Budget, num_blocks: int) -> None:
        self.cost, self.budget, self.num_blocks = cost, budget, num_blocks
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.busy = False
        self.steps = 0
        self.source_seconds: dict[str, float] = defaultdict(float)  # simulated step time by cost source
        self._chunks: list[tuple[_Seq, int]] = []
        self.reserves: list[int] = []  # requests whose reservation waits for the current step to end
        self.attaches: list[int] = []  # requests whose KV arrived during the current step (P/D decode)
        self.idle_since: float | None = float("-inf")  # when the instance last ran out of work (None: busy)

    def free_blocks(self) -> int:
        return self.num_blocks - sum(s.blocks for s in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def start_step(self, now: float = 0.0) -> float:
        """Plan a step starting at ``now`` with the engine's policy; returns its predicted duration."""
        bs = self.budget.block_size
        running = [SeqView(str(s.req.rid), s.tokens, s.computed, s.blocks, s.blocks) for s in self.running]
        waiting = [SeqView(str(s.req.rid), s.tokens, s.computed, 0) for s in self.waiting[:self.budget.max_seqs]]
        plan = schedule(running, waiting, self.free_blocks(), self.budget)
        by_id = {str(s.req.rid): s for s in self.running + self.waiting}
        for sid in plan.preempted:
            s = by_id[sid]
            self.running.remove(s)
            s.blocks, s.computed = 0, 0
            self.waiting.insert(0, s)
        for sid in plan.admitted:
            s = by_id[sid]
            self.waiting.remove(s)
            self.running.append(s)
        self._chunks = []
        for s in self.running:
            n = plan.chunks.get(str(s.req.rid))
            if n:
                s.blocks = max(s.blocks, -(-(s.computed + n) // bs))
                self._chunks.append((s, n))
        if not self._chunks:
            return 0.0
        shape = StepShape(tuple(n for _, n in self._chunks), tuple(s.computed + n for s, n in self._chunks))
        sampled = sum(s.computed + n == s.tokens for s, n in self._chunks)
        self.steps += 1
        idle_s = 0.0 if self.idle_since is None else now - self.idle_since
        self.idle_since = None
        lone = self.running[0].idle_found if len(self.running) == 1 else 0.0
        cost = self.cost.step(shape, sampled, len(self.running), idle_s, lone)
        for source, seconds in cost.sources().items():
            self.source_seconds[source] += seconds
        # the hand-off of the step's tokens before the next step: the engine is not in a step then
        # (its tokens reach the clients during it), so it is not in source_seconds (busy time)
        handoff = self.cost.handoff(sampled, len(self.running))
        return cost.seconds + (handoff.seconds if handoff is not None else 0.0)

    def end_step(self, now: float) -> list[_Seq]:
        """Apply the planned step at its end; returns the sequences that leave this instance."""
        leaving = []
        for s, n in self._chunks:
            s.computed += n
            if s.computed == s.tokens:
                s.generated += 1
                if s.first is None:
                    s.first = now
                if s.generated >= s.stop_after:
                    self.running.remove(s)
                    s.blocks = 0
                    leaving.append(s)
        self._chunks = []
        return leaving


def simulate(requests: list[SimRequest], prefill: SimEngine, decode: SimEngine | None = None,
             max_concurrency: int | None = None,
             transfer_s: Callable[[int], float] = lambda n: 0.0) -> SimResult:
    """Run ``requests`` through one engine (``decode`` None: colocated) or a P/D pair."""
    seqs = {r.rid: _Seq(r) for r in requests}
    order = sorted(requests, key=lambda r: (r.offset, r.rid))
    events: list[tuple[float, int, str, int]] = []
    tick = itertools.count()
    engines = [prefill] if decode is None else [prefill, decode]
    limit = max_concurrency or len(requests)
    for r in order[:limit]:
        heapq.heappush(events, (r.offset, next(tick), "send", r.rid))
    queued = order[limit:]
    res = SimResult()
    inflight, stack_idle_since = 0, float("-inf")  # the serving stack: requests in flight, idle since

    def kick(idx: int, now: float) -> None:
        eng = engines[idx]
        if not eng.busy and eng.has_work():
            dt = eng.start_step(now)
            if eng._chunks:
                eng.busy = True
                heapq.heappush(events, (now + dt, next(tick), "step", idx))
        if not eng.busy and not eng.has_work() and eng.idle_since is None:
            eng.idle_since = now  # its loop now waits for a request

    def finish(s: _Seq, now: float) -> None:
        """The last token leaves the engine at ``now``; the client has it the way out later."""
        nonlocal inflight, stack_idle_since
        assert s.first is not None
        s.done = now + s.way_out
        wake = prefill.cost.api_wake(s.idle_found)
        res.ttft.append(s.first + s.way_out - s.sent + (wake.seconds if wake is not None else 0.0))
        inflight -= 1
        if not inflight:
            stack_idle_since = s.done
        if s.req.output_len > 1:
            res.tpot.append((now - s.first) / (s.req.output_len - 1))
        res.output_tokens += s.req.output_len
        res.duration = max(res.duration, s.done)
        if queued:  # a closed-loop client sends its next request when it has this one's end
            nxt = queued.pop(0)
            heapq.heappush(events, (max(s.done, nxt.offset), next(tick), "send", nxt.rid))

    def attach(s: _Seq, now: float) -> None:
        """The decode instance takes the sequence over and streams its first token."""
        s.first = now
        s.stop_after = s.req.output_len
        engines[1].waiting.append(s)

    while events:
        now, _, kind, key = heapq.heappop(events)
        if kind == "send":
            s = seqs[key]
            s.sent = now
            s.idle_found = now - stack_idle_since if not inflight else 0.0
            latency, way_in = (prefill.cost.request_latency(s.req.prompt_len, inflight),
                               prefill.cost.request_in(s.req.prompt_len, inflight))
            s.way_out = latency - way_in
            inflight += 1
            s.stop_after = s.req.output_len if decode is None else 1
            if decode is None:
                heapq.heappush(events, (now + way_in, next(tick), "admit", key))
            elif decode.busy:
                decode.reserves.append(key)
            else:
                heapq.heappush(events, (now, next(tick), "prefill", key))
        elif kind in ("prefill", "admit"):  # the prefill worker has it; the colocated engine's thread has it
            prefill.waiting.append(seqs[key])
            kick(0, now)
        elif kind == "kv":
            if engines[1].busy:  # the decode worker attaches the KV between steps
                engines[1].attaches.append(key)
            else:
                attach(seqs[key], now)
                kick(1, now)
        else:
            eng = engines[key]
            eng.busy = False
            for rid in eng.reserves:  # the decode worker answers reservations between steps
                heapq.heappush(events, (now, next(tick), "prefill", rid))
            eng.reserves.clear()
            for rid in eng.attaches:
                attach(seqs[rid], now)
            eng.attaches.clear()
            for s in eng.end_step(now):
                if s.generated >= s.req.output_len:
                    finish(s, now)
                else:  # P/D handoff: the prompt's KV moves to the decode instance
                    s.computed = s.req.prompt_len
                    heapq.heappush(events, (now + transfer_s(s.req.prompt_len), next(tick), "kv", s.req.rid))
            kick(key, now)
    res.steps = sum(e.steps for e in engines)
    res.busy_seconds = sum(sum(e.source_seconds.values()) for e in engines)
    return res
