"""Step costs of this machine's engine from a measured profile (pure; no timing here).

A step's time is built from operators, never from a fitted end-to-end constant:

    step = forward operators + composition overhead + sampling + engine host work + token delivery
    (then, before the next step, the engine thread's hand-off of the step's tokens)

- **Forward operators.** Decode-sized batches (at most ``Linear.small_rows`` rows, the CPU
  backend's one-call layers) cost one ``layer_decode``/``layer_decode_dense`` per layer; larger
  batches cost the per-operator path (norms, MLA prolog/core/epilogue, dense MLP or routing +
  experts + shared expert). Then the final norm and the vocabulary head over the sampled rows.
- **Composition overhead** is measured, not assumed: at each profiled model-runner step
  (``step_decode``, ``step_prefill``) it is the step's time minus the sum of its operators
  (metadata, embedding, rope tables, the native step set-up, what runs between kernels). It is
  interpolated over the same grid as those steps, between steps of the same path only (one-call
  layers up to 64 rows, else per operator: their overheads differ by several times).
- **Sampling** and **engine host work** (scheduler, block manager, detokenizer) are their own
  profiled operators.
- **Token delivery** is the serving stack's CPU time per streamed token (``api_token``: the engine
  thread's hand-off, the SSE chunk, the client parsing it), profiled with a stand-in engine
  (:mod:`matrixinfer.sim.profile_api`). It runs beside the engine only on cores outside the
  engine's thread team; on the team's cores it lengthens the step by its whole CPU time, not by a
  fair share. The team's threads meet at a barrier after every parallel region, so a thread that
  loses its core to the API server or the client holds all of them up, and a waiting thread's core
  is not free either: the next region needs it at once. The team holds ``max(threads,
  engine_cores)`` cores (``engine_cores``: CPU seconds per second of the engine's steps, measured
  with ``engine_host``). Measured on the 2-core VM with the demo model, colocated, 2 threads
  (2026-11-30, quiet): a batch-64 decode step took 13.3 ms in process and 23.0 ms while serving
  the same load over HTTP, where the stack's CPU per step is about 8 ms (64 tokens at
  ``api_token``); the fair-share model put it at 13.3 ms, since the engine kept only 1.42 of the
  2 cores busy. A request's TTFT also gets the stack's latency at the load it finds
  (``api_request``, :meth:`LocalCostModel.request_latency`; the engine has the request its way
  in, ``api_in``, after the send: :meth:`LocalCostModel.request_in`), and, when it finds the
  stack idle (no request in flight) for ``idle_s`` seconds, the profiled extra TTFT of a lone
  request after that long a gap
  over one sent back to back (``api_wake``: the event loop, the engine thread's wait and the
  client all sleep in between; scaled below the shortest gap as ``idle_wake`` is).
- **Hand-off between steps** (``api_gap``): after a step that delivered tokens, the engine thread
  hands them to the API's event loop before it starts the next step; the profiled wall time per
  token delivered is added after the step as time the engine is not in a step (it is not part of
  the step's cost, and not CPU taken from it: at batch 64 served on the 2-core VM, the simulated
  step matched the served one to 0.0% while the served engine spent 10% of the run between steps).
- **Waiting inside the step while serving** (``serve_wait``, colocated only): the served engine's
  thread shares its process with the API server, and within a step it waits for the interpreter
  lock the API's thread holds (and for a core the client or the API took). The profile serves the
  real engine over HTTP at each stream count and measures the share of its step time that was not
  its own CPU time (:func:`matrixinfer.sim.profile_api.profile_serve_wait`); a step's operators
  and overheads, profiled in one process where the thread does not wait, are its CPU time, so the
  served step is that over ``1 - share``. Measured on the 2-core Intel Xeon VM (2026-12-01, one
  engine thread): 0.76-0.92 ms of an 11.2-12.6 ms batch-64 step, 0.10 ms of a 2.4 ms batch-8
  step. A P/D worker's engine has its own process and is not charged.
- **Computing beside the serving stack** (``serve_cpu``, both deployments): a real ``serve
  --colocated`` process's engine CPU time per step (its own counters) over the same requests'
  steps run without the API (profiled with ``serve_wait``). The API server and the client work
  on the core the engine leaves them, and share its caches and memory bus, so the same step
  computes slower; a step's operators and overheads are multiplied by it (at least 1). Measured
  on a 2-core AMD EPYC VM (2026-12-01, one engine thread): 1.04-1.14 at one stream, about 1.0
  at 8-64. A P/D decode worker has the router, the prefill worker and the client beside it
  instead: its steps of a lone request take ``serve_cpu_pd`` at the idle gap the request found
  (a real P/D ``serve``'s decode worker on lone requests sent that long apart: 0.94-1.04 back to
  back, about 1.3 at 0.4 s there, for the whole request), its steps of more sequences the
  colocated ratio. A step with a prompt chunk takes the ratio measured on prompt steps
  (``serve_cpu_prefill``): compute bound, they slow less (charged the decode ratio, the
  simulated TPOT at 8 requests/s came out 24% long, its mixed steps 14% long).
- **Between steps while serving** (``serve_gap``, colocated): the served engine thread's wall
  time between a step that delivered tokens and the next, per token, measured in the same
  served runs; it replaces the stand-in's ``api_gap``, whose steps sleep and so free the
  interpreter lock the real engine's steps hold (the stand-in measured nothing at 64 streams
  where the served engine was out of its steps 6-8% of the time).
- **Idle wake-up** (``idle_wake``, :mod:`matrixinfer.sim.profile_idle`): a step that starts after
  the engine had no work for ``idle_s`` seconds costs the profiled extra time of a step after that
  long an idle gap over the same step back to back (the team's threads, woken, wait for cores,
  then read memory that went cold while they slept: the cost grows with the gap, profiled from
  milliseconds to a second). Gaps shorter than the smallest profiled one scale it down linearly to
  nothing at zero; longer ones take the longest's. Profiles without it (taken before it existed) add nothing.

Every term is a :class:`~matrixinfer.sim.profile_data.Cost` that says whether it came from the
profile (interpolated), the scaled roofline (outside the grid) or the nearest measurement.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from matrixinfer.sim.local_ops import Dims, StepShape, work
from matrixinfer.sim.profile_data import Cost, OpTable, Profile

# host work (no roofline to scale); engine_cores is a ratio (cores busy), not seconds
HOST_OPS = ("engine_host", "ems_get", "ems_put", "api_request", "api_in", "api_wake", "api_token", "api_gap",
            "engine_cores", "idle_wake", "kv_transfer", "serve_wait", "serve_cpu", "serve_cpu_pd", "serve_cpu_prefill",
            "serve_gap", "pd_request")
REQUIRED_OPS = ("mla_prolog", "mla_core_q1", "mla_core_prefill", "mla_epilogue", "rmsnorm", "lm_head", "sampling",
                "layer_decode", "step_decode", "step_prefill", "engine_host", "api_request", "api_token",
                "engine_cores")
SMALL_ROWS = 64  # matrixinfer.model.layers.Linear.small_rows: the CPU backend's one-call layer limit


@dataclass
class StepCost:
    """A step's predicted seconds and the terms that make it up."""

    seconds: float = 0.0
    terms: list[Cost] = field(default_factory=list)

    def add(self, cost: Cost, times: float = 1.0) -> None:
        self.seconds += cost.seconds * times
        self.terms.append(Cost(cost.seconds * times, cost.source, cost.op))

    def sources(self) -> dict[str, float]:
        """Seconds per source (``profile``, ``roofline``, ``linear``, ``nearest``)."""
        out: dict[str, float] = defaultdict(float)
        for t in self.terms:
            out[t.source] += t.seconds
        return out


class LocalCostModel:
    """Operator and step costs of one model on the device a :class:`Profile` was taken on."""

    def __init__(self, profile: Profile, dims: Dims, in_api_process: bool = True) -> None:
        """``in_api_process``: the engine runs in the API server's process (``serve --colocated``),
        so its steps wait as ``serve_wait`` measured; a P/D worker's engine has a process of its own."""
        self.profile, self.dims = profile, dims
        self.in_api_process = in_api_process
        missing = sorted(set(REQUIRED_OPS) - set(profile.ops))
        if missing:
            raise ValueError(f"the profile ({profile.meta.get('date', 'undated')}) lacks {', '.join(missing)}: "
                             "take a new one with `matrixinfer profile`")
        self.native = profile.meta.get("device") == "cpu"
        self.cores = float(profile.meta.get("cores") or 1)  # the profiled machine's cores
        self.threads = float(profile.meta.get("threads") or 1)  # the engine's thread team
        self._composition = {"decode": self._residuals("step_decode", True),
                             "prefill": self._residuals("step_prefill", False)}

    def op(self, name: str, *point: float) -> Cost:
        if name.startswith("composition_"):
            kind = name.removeprefix("composition_")
            tables = self._composition[kind]
            table = tables.get(self._one_call(kind == "decode", point[0])) or next(iter(tables.values()))
            if table.covers(point):
                return Cost(table.interpolate(point), "profile", name)
            return Cost(table.seconds[table.nearest(point)], "nearest", name)
        if name in HOST_OPS:
            return self.profile.lookup(name, point)
        return self.profile.lookup(name, point, lambda p: work(self.dims, name, p))

    def forward_ops(self, shape: StepShape, sampled: int) -> StepCost:
        """The forward pass's operators (no composition overhead)."""
        d, t, keys = self.dims, float(shape.tokens), shape.mean_keys
        out = StepCost()
        if self._one_call(shape.decode_only, t):
            if d.moe_layers:
                out.add(self.op("layer_decode", t, keys), d.moe_layers)
            if d.dense_layers:
                out.add(self.op("layer_decode_dense", t, keys), d.dense_layers)
        else:
            for name in ("rmsnorm", "rmsnorm", "mla_prolog", "mla_epilogue"):
                out.add(self.op(name, t), d.layers)
            decodes = [c for q, c in zip(shape.query_lens, shape.context_lens) if q == 1]
            if decodes:
                out.add(self.op("mla_core_q1", float(len(decodes)), sum(decodes) / len(decodes)), d.layers)
            for q in shape.query_lens:  # prompt chunks: causal attention over the chunk
                if q > 1:
                    out.add(self.op("mla_core_prefill", float(q)), d.layers)
            if d.dense_layers:
                out.add(self.op("dense_mlp", t), d.dense_layers)
            if d.moe_layers:
                out.add(self.op("routing", t), d.moe_layers)
                out.add(self.op("experts", max(t * d.top_k / d.n_experts, 1.0)), d.moe_layers)
                if d.n_shared:
                    out.add(self.op("shared_expert", t), d.moe_layers)
        out.add(self.op("rmsnorm", t))
        if sampled:
            out.add(self.op("lm_head", float(sampled)))
        return out

    def forward(self, shape: StepShape, sampled: int) -> StepCost:
        """The model runner's step: operators plus the measured composition overhead."""
        out = self.forward_ops(shape, sampled)
        if shape.decode_only:
            out.add(self.op("composition_decode", float(shape.tokens), shape.mean_keys))
        else:
            out.add(self.op("composition_prefill", float(shape.tokens)))
        return out

    def step(self, shape: StepShape, sampled: int, running: int, idle_s: float = 0.0,
             lone_idle_s: float = 0.0) -> StepCost:
        """An engine step: forward, sampling of ``sampled`` rows, host work with ``running`` sequences,
        the delivery of the ``sampled`` new tokens to ``running`` streaming clients, and, when the
        engine was idle for ``idle_s`` seconds before it, the wake-up. ``lone_idle_s``: with one
        sequence running, how long the serving stack had been idle when its request was sent (a
        P/D decode worker's steps of such a request compute slower: ``serve_cpu_pd``)."""
        streams = float(max(running, 1))
        out = self.forward(shape, sampled)
        if sampled:
            out.add(self.op("sampling", float(sampled)))
        out.add(self.op("engine_host", streams))
        if {"serve_cpu", "serve_cpu_prefill"} <= self.profile.ops.keys():
            # the same work computes slower beside the serving stack: decode steps at their stream
            # count, steps with a prompt chunk as prompt steps
            pd = self.profile.ops.get("serve_cpu_pd")
            if shape.decode_only and running <= 1 and not self.in_api_process and pd is not None and pd.points:
                # a P/D worker's lone request, by the idle gap it found (the longest profiled beyond it)
                ratio = self.op("serve_cpu_pd", min(max(lone_idle_s, pd.values(0)[0]), pd.values(0)[-1]))
            elif shape.decode_only:
                ratio = self.op("serve_cpu", streams)
            else:
                ratio = self.op("serve_cpu_prefill", float(shape.tokens))
            out.add(Cost(out.seconds * max(ratio.seconds - 1.0, 0.0), ratio.source, ratio.op))
        if sampled:
            per_token = self.op("api_token", streams)
            team = max(self.threads, self.op("engine_cores", streams).seconds)
            idle = max(self.cores - team, 0.0) * out.seconds  # cores outside the engine's thread team
            out.add(Cost(max(per_token.seconds * sampled - idle, 0.0), per_token.source, "api_token"))
        if self.in_api_process and "serve_wait" in self.profile.ops:
            share = self.op("serve_wait", streams)
            w = min(max(share.seconds, 0.0), 0.5)
            out.add(Cost(out.seconds * w / (1.0 - w), share.source, "serve_wait"))
        wake = self.idle_wake(shape.tokens, idle_s) if idle_s > 0 else None
        if wake is not None:  # after the delivery: the wait for cores gives the stack no idle core
            out.add(wake)
        return out

    def handoff(self, sampled: int, running: int) -> Cost | None:
        """The engine thread's time between a step that delivered ``sampled`` tokens to ``running``
        streams and its next step: colocated, the real served engine's (``serve_gap``) where
        profiled; else, and for a P/D worker, the stand-in's (``api_gap``); None where the profile
        has neither (older profiles)."""
        op = "serve_gap" if self.in_api_process and "serve_gap" in self.profile.ops else "api_gap"
        if not sampled or op not in self.profile.ops:
            return None
        per_token = self.op(op, float(max(running, 1)))
        return Cost(per_token.seconds * sampled, per_token.source, op)

    def idle_wake(self, tokens: int, idle_s: float) -> Cost | None:
        """Extra time of a ``tokens``-token step after ``idle_s`` idle seconds (None: not profiled)."""
        table = self.profile.ops.get("idle_wake")
        if table is None or not table.points:
            return None
        ts = table.values(0)
        t = min(max(float(tokens), ts[0]), ts[-1])  # the step sizes' range covers decode to long chunks
        return self._after_idle("idle_wake", idle_s, t)

    def api_wake(self, idle_s: float) -> Cost | None:
        """Extra TTFT of a request sent after the serving stack had no request for ``idle_s``
        seconds (``api_wake``; None where the profile has none: older profiles)."""
        table = self.profile.ops.get("api_wake")
        if table is None or not table.points or idle_s <= 0:
            return None
        return self._after_idle("api_wake", idle_s)

    def _after_idle(self, op: str, idle_s: float, *lead: float) -> Cost:
        """``op`` at ``(*lead, idle_s)``, its last axis the idle gap: beyond the longest profiled gap,
        the longest's; below the shortest, the shortest's scaled down linearly to nothing at zero."""
        gaps = self.profile.ops[op].values(len(lead))
        gap = min(idle_s, gaps[-1])
        cost = self.profile.lookup(op, (*lead, max(gap, gaps[0])))
        return Cost(cost.seconds * min(gap / gaps[0], 1.0), cost.source, op)

    def kv_transfer(self, tokens: int) -> float | None:
        """Seconds to move a ``tokens``-token prompt's KV to a decode worker (None: not profiled)."""
        if "kv_transfer" not in self.profile.ops:
            return None
        return self.op("kv_transfer", float(tokens)).seconds

    def request_latency(self, prompt_len: int, load: int = 0) -> float:
        """What the serving stack adds to a request's TTFT (request parsing, the hand-off to the
        engine thread, the first chunk's trip to the client) with ``load`` other requests
        streaming; for a P/D worker's model (``in_api_process`` False) also the P/D path's own
        latency, ``pd_request``, where profiled (the router's hop to the prefill worker, the decode
        worker's reservation, the KV hand-off and the token relay, beyond what the simulated steps
        and transfer already hold)."""
        latency = self._stack("api_request", prompt_len, load)
        if not self.in_api_process and "pd_request" in self.profile.ops:
            latency += self.op("pd_request", float(prompt_len)).seconds
        return latency

    def request_in(self, prompt_len: int, load: int = 0) -> float:
        """The part of :meth:`request_latency` before the engine thread has the request (``api_in``:
        the way in, and the thread's pick-up when it was idle); 0 where the profile has none (older
        profiles), and for a P/D worker's model (its ``pd_request`` is measured end to end)."""
        if not self.in_api_process or "api_in" not in self.profile.ops:
            return 0.0
        return min(self._stack("api_in", prompt_len, load), self._stack("api_request", prompt_len, load))

    def _stack(self, op: str, prompt_len: int, load: int) -> float:
        """``op`` at a prompt length and load; tables taken before the load axis have the length only."""
        if len(self.profile.ops[op].axes) == 1:
            return self.op(op, float(prompt_len)).seconds
        return self.op(op, float(prompt_len), float(load)).seconds

    def _one_call(self, decode_only: bool, tokens: float) -> bool:
        """Whether a step of ``tokens`` rows runs the CPU backend's one-call layers (else the
        per-operator path)."""
        return self.native and tokens <= SMALL_ROWS and (decode_only or self.dims.absorbed_prefill)

    def _residuals(self, op: str, decode: bool) -> dict[bool, OpTable]:
        """Measured model-runner step minus its operators, at each profiled step, per path (one-call
        layers or not: keyed as :meth:`_one_call`). A step is interpolated only between steps of
        its own path: the two paths' overheads differ by several times (the per-operator path's
        dispatch, measured at 65 prompt tokens on the demo model: 19 ms a step against 15 ms at 64
        with one call per layer), so a residual interpolated across the switch, from 64 tokens to
        128, put a 65-token prefill step at 6 ms. Where a path has no profiled step, the other's
        residuals stand in."""
        measured = self.profile.ops.get(op)
        if measured is None:
            raise KeyError(f"the profile has no {op!r} measurements, which the composition overhead needs")
        tables: dict[bool, OpTable] = {}
        for point, seconds in zip(measured.points, measured.seconds):
            t = int(point[0])
            shape = StepShape((1,) * t, (int(point[1]),) * t) if decode else StepShape((t,), (t,))
            table = tables.setdefault(self._one_call(decode, t), OpTable(measured.axes))
            table.add(point, seconds - self.forward_ops(shape, t if decode else 1).seconds)
        return tables
