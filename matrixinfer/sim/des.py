"""Request-level discrete-event simulation of a P/D/C deployment (simpy).

Requests arrive (Poisson), a stateless router sends each to the prefill instance with the
least queued tokens, the prefill instance runs batches (time from the prefill step model, with
context-cache hits loaded from the pool), the KV moves to the decode router, which admits it to
the decode instance with the fewest running sequences; decode instances run continuous-batching
steps (time from the decode step model at the current batch) and emit 1 + Bernoulli(acceptance)
tokens per sequence per step. Requests are rows in numpy arrays, not simpy processes, so a
decode instance with 15,000 running sequences costs one event per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import simpy


@dataclass(frozen=True)
class Workload:
    """Arrival rate (requests/s), prompt length, mean output length, cache reuse fraction."""

    rate: float
    prompt: int
    output: int
    reuse: float = 0.0
    output_dist: str = "fixed"   # "fixed" or "geometric" (mean ``output``)


@dataclass(frozen=True)
class Deployment:
    """Pools and their step models (seconds as a function of load)."""

    prefill_instances: int
    prefill_chips: int
    prefill_batch_tokens: int                  # max prompt tokens per prefill batch (instance)
    prefill_time: Callable[[int], float]       # prompt tokens in batch -> seconds
    decode_instances: int
    decode_chips: int
    decode_max_batch: int                      # max running sequences per instance
    decode_time: Callable[[int], float]        # running sequences -> step seconds
    acceptance: float = 0.0                    # MTP: extra token with this probability
    kv_transfer_s: float = 0.0                 # prefill -> decode KV move per request


@dataclass(frozen=True)
class SimResult:
    """Percentiles (seconds), throughput and goodput of one run."""

    completed: int
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    output_tok_s: float
    output_tok_s_per_decode_chip: float
    goodput_rps: float
    mean_decode_batch: float
    wall_events: int


def simulate(dep: Deployment, wl: Workload, duration_s: float, seed: int = 0,
             ttft_slo: float = float("inf"), tpot_slo: float = float("inf"),
             warmup_s: float = 0.0) -> SimResult:
    """Run the deployment for ``duration_s`` simulated seconds; statistics skip ``warmup_s``."""
    rng = np.random.default_rng(seed)
    env = simpy.Environment()
    prefill_q: list[deque] = [deque() for _ in range(dep.prefill_instances)]
    prefill_tokens = [0] * dep.prefill_instances
    prefill_wake = [env.event() for _ in range(dep.prefill_instances)]
    decode_q: deque = deque()
    decode_running = [0] * dep.decode_instances
    decode_wake = [env.event() for _ in range(dep.decode_instances)]
    done: list[tuple[float, float, float, int]] = []   # arrival, first token, finish, output
    produced = [0.0]
    batch_acc = [0.0, 0]
    events = [0]
    computed_prompt = max(int(wl.prompt * (1 - wl.reuse)), 1)
    ptime = lru_cache(maxsize=None)(dep.prefill_time)
    dtime = lru_cache(maxsize=None)(dep.decode_time)

    def poke(events_list: list, i: int) -> None:
        if not events_list[i].triggered:
            events_list[i].succeed()

    def arrivals():
        while True:
            yield env.timeout(rng.exponential(1.0 / wl.rate))
            i = min(range(dep.prefill_instances), key=prefill_tokens.__getitem__)
            prefill_q[i].append(env.now)
            prefill_tokens[i] += computed_prompt
            poke(prefill_wake, i)

    def prefill(i: int):
        while True:
            if not prefill_q[i]:
                prefill_wake[i] = env.event()
                yield prefill_wake[i]
            batch: list[float] = []   # arrival times
            tokens = 0
            while prefill_q[i] and (not batch or tokens + computed_prompt <= dep.prefill_batch_tokens):
                batch.append(prefill_q[i].popleft())
                tokens += computed_prompt
            yield env.timeout(ptime(len(batch) * wl.prompt))
            events[0] += 1
            prefill_tokens[i] -= tokens
            ready = env.now + dep.kv_transfer_s
            for arrival in batch:
                out = wl.output if wl.output_dist == "fixed" else int(rng.geometric(1.0 / wl.output))
                decode_q.append((arrival, ready, max(out, 1)))
            for j in range(dep.decode_instances):
                poke(decode_wake, j)

    def decode(j: int):
        arr = np.empty(0)
        first = np.empty(0)
        remaining = np.empty(0)
        total = np.empty(0)
        while True:
            room = dep.decode_max_batch - len(arr)
            if room > 0 and decode_q:
                take: list[tuple[float, float, int]] = []   # arrival, KV ready, output tokens
                while decode_q and len(take) < room and decode_q[0][1] <= env.now:
                    take.append(decode_q.popleft())
                if take:
                    a, _, o = map(np.array, zip(*take))
                    arr = np.concatenate([arr, a])
                    first = np.concatenate([first, np.full(len(a), np.nan)])
                    remaining = np.concatenate([remaining, o.astype(float)])
                    total = np.concatenate([total, o.astype(float)])
            if len(arr) == 0:
                decode_wake[j] = env.event()
                wait = [decode_wake[j]]
                if decode_q:
                    wait.append(env.timeout(max(decode_q[0][1] - env.now, 1e-6)))
                yield env.any_of(wait)
                continue
            decode_running[j] = len(arr)
            yield env.timeout(dtime(len(arr)))
            events[0] += 1
            if env.now >= warmup_s:
                batch_acc[0] += len(arr)
                batch_acc[1] += 1
            step_tokens = 1.0 + (rng.random(len(arr)) < dep.acceptance)
            step_tokens = np.minimum(step_tokens, remaining)
            if env.now >= warmup_s:
                produced[0] += float(step_tokens.sum())
            first = np.where(np.isnan(first), env.now, first)
            remaining -= step_tokens
            fin = remaining <= 0
            if fin.any():
                for a, f, o in zip(arr[fin], first[fin], total[fin]):
                    done.append((a, f, env.now, int(o)))
                keep = ~fin
                arr, first, remaining, total = arr[keep], first[keep], remaining[keep], total[keep]

    env.process(arrivals())
    for i in range(dep.prefill_instances):
        env.process(prefill(i))
    for j in range(dep.decode_instances):
        env.process(decode(j))
    env.run(until=duration_s)

    rows = np.array([d for d in done if d[0] >= warmup_s]) if done else np.empty((0, 4))
    span = max(duration_s - warmup_s, 1e-9)
    if len(rows) == 0:
        nan = float("nan")
        return SimResult(completed=0, ttft_p50=nan, ttft_p99=nan, tpot_p50=nan, tpot_p99=nan, output_tok_s=0.0,
                         output_tok_s_per_decode_chip=0.0, goodput_rps=0.0, mean_decode_batch=0.0,
                         wall_events=events[0])
    ttft = rows[:, 1] - rows[:, 0]
    tpot = (rows[:, 2] - rows[:, 1]) / np.maximum(rows[:, 3] - 1, 1)
    good = np.sum((ttft <= ttft_slo) & (tpot <= tpot_slo))
    out_rate = produced[0] / span
    return SimResult(
        completed=len(rows),
        ttft_p50=float(np.percentile(ttft, 50)), ttft_p99=float(np.percentile(ttft, 99)),
        tpot_p50=float(np.percentile(tpot, 50)), tpot_p99=float(np.percentile(tpot, 99)),
        output_tok_s=out_rate,
        output_tok_s_per_decode_chip=out_rate / (dep.decode_instances * dep.decode_chips),
        goodput_rps=float(good) / span,
        mean_decode_batch=batch_acc[0] / max(batch_acc[1], 1),
        wall_events=events[0],
    )
