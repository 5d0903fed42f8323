"""``idle_wake``: what a step costs extra when the engine was idle before it, profiled.

The operator profile times each step back to back, with the engine's thread team hot. A served
engine at a low request rate is often idle: its loop waits for the next request, and that
request's prefill is the first step after the wait. Measured on the 2-core VM (demo model, two
threads, quiet: other processes used 0.00-0.02 cores; 2026-11-30), a 160-token prefill after
100 ms idle took 30.9-33.0 ms against 22.5 ms back to back, and the whole difference was time the
engine thread spent runnable but not running (``/proc/thread-self/schedstat``: 9.5-9.9 ms of
run-queue wait against 0.01 ms); its CPU time did not change. The team's threads are woken onto
the cores again and do not at once get one each. The queue wait of a request that finds the engine
idle is therefore a step of its own kind, and its cost is measured here, not assumed.

The extra time also grows with the gap, so the gaps run from milliseconds to a second. On a 2-core
Intel Xeon VM (2026-12-01, one thread, quiet), a 128-token prefill took 12.7 ms back to back,
20.4 ms after 0.1 s idle, 30.5 ms after 0.3 s and 54.2 ms after 1 s. Its CPU time grew by the
same amount: the engine thread was not waiting for a core but reading memory that had gone cold
while it slept (the 46 MiB of weights came back at 0.6-1.2 GB/s; docs/simulator.md). A served
engine at 2 requests/s sleeps ~0.4 s between requests. With the gaps profiled only up to 0.1 s,
the simulated TTFT at 2 and 8 requests/s was 44% and 36% short.

For each step size (``tokens``: 1 is a decode step of one sequence, more is one prompt chunk) and
idle gap (``idle_s``), rounds of: the step twice (the second timed: hot), ``idle_s`` of sleep, the
step again (timed: after idle). The value is the mean after-idle time minus the mean hot time
(never below zero), in seconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import torch


def profile_idle(step_for: Callable[[int], Callable[[], object]], tokens: tuple[int, ...],
                 gaps: tuple[float, ...], rounds: int, table) -> Iterator[str]:
    """Measure ``idle_wake`` at each ``tokens`` x ``gaps`` point into ``table(name, axes)`` (a
    :class:`~matrixinfer.sim.profile_data.Profile`'s ``table``). ``step_for(t)`` is the model
    runner's step of ``t`` tokens; call this on the thread the engine's steps run on."""
    with torch.inference_mode():
        for t in tokens:
            step = step_for(t)
            step()  # warm-up: the shape's first call allocates
            for gap in gaps:
                hot, after = [], []
                for _ in range(rounds):
                    step()
                    t0 = time.perf_counter()
                    step()
                    hot.append(time.perf_counter() - t0)
                    time.sleep(gap)
                    t0 = time.perf_counter()
                    step()
                    after.append(time.perf_counter() - t0)
                extra = statistics.fmean(after) - statistics.fmean(hot)
                table("idle_wake", ("tokens", "idle_s")).add((t, gap), max(extra, 0.0))
            yield f"idle wake {t}"
