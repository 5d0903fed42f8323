"""Which CPUs an engine thread's OpenMP team is pinned to (``--cpu-bind``), and the pinning.

A CPU engine runs each step's kernels on a team of OpenMP threads started from its engine thread.
When the engine has been idle, the team's workers sleep; the step after the wait wakes them, and on
the 2-core VM the woken worker was often placed on the engine thread's own core while the other
core stayed idle: the step then waited for a core until the scheduler moved one of them
(measured, demo model, two threads, quiet: a 160-token prefill after 100 ms idle took 30-33 ms
against 22.5 ms back to back, 9.5-10 ms of it run-queue wait; pinned, 25.4 ms and 0.01 ms). That
is a request's time to first token at a low request rate. vLLM's and SGLang's CPU backends pin
their OpenMP threads for the same reasons (``VLLM_CPU_OMP_THREADS_BIND``).

``auto`` (the default) pins only where the team has a core for each thread and takes every core
the process may use, or all but one (the colocated server's engine, which leaves a core to the API
server: :func:`serving_threads`), to the first CPUs; engines that share the cores (P/D
workers, EP ranks and data-parallel engines of one host each get a share of the threads) are left
to the scheduler, which can still move them apart, and so is a second engine thread of the same
process while one holds the cores. ``none`` never pins; a list (``0,1`` or ``0-3``) pins thread
``i`` of the team to the ``i``-th CPU listed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

_claimed: set[int] = set()  # CPUs an engine thread of this process holds
_lock = threading.Lock()


def serving_threads(cores: int) -> int:
    """The colocated CPU server's engine threads on ``cores`` cores: one core is left to the serving
    stack (the API server's thread, which formats and writes every streamed token, and clients on
    the same host), as vLLM's CPU backend reserves CPUs for its front end. On the 2-core VM,
    `matrixinfer serve --colocated` and the bench client, 32-token prompts, 128 tokens out, the
    engine at one thread against two (alternating runs): 377-489 against 245-339 tok/s at
    concurrency 1, 1,326-1,673 against 998-1,166 at 8, 2,540 against 1,843 at 32, 2,693-2,922
    against 2,144-2,229 at 64. With two, the team's second thread lost its core to the API thread
    at every parallel region of every step (a served batch-1 step took 2.8-3.8 ms, 1.3 ms in one
    process). ``MATRIXINFER_THREADS`` overrides it."""
    return max(1, cores - 1)


def parse_cpu_list(text: str) -> list[int]:
    """``0,1`` / ``0-3`` / ``0-1,4`` as a list of CPU numbers, in order, without repeats."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"cpu_bind {text!r}: expected 'auto', 'none' or CPU numbers like 0,1 or 0-3") from None
        if first < 0 or last < first:
            raise ValueError(f"cpu_bind {text!r}: {part!r} is not a CPU range")
        out.extend(c for c in range(first, last + 1) if c not in out)
    return out


def check_setting(setting: str) -> None:
    """Raise ValueError for a ``--cpu-bind`` value that is not ``auto``, ``none`` or a CPU list."""
    if setting not in ("auto", "none"):
        parse_cpu_list(setting)


def team_cpus(setting: str, threads: int, available: Sequence[int], claimed: Sequence[int] = ()) -> list[int] | None:
    """The CPUs to pin a team of ``threads`` threads to, thread ``i`` to the ``i``-th (None: leave it
    to the scheduler), for the ``--cpu-bind`` ``setting``, the CPUs this process may run on and the
    ones another engine thread of it holds. Pure: tested without pinning anything."""
    if setting == "none":
        return None
    if setting == "auto":
        if threads < 2 or not len(available) - 1 <= threads <= len(available) or set(available) & set(claimed):
            return None
        return sorted(available)[:threads]
    cpus = parse_cpu_list(setting)
    outside = [c for c in cpus if c not in available]
    if outside:
        raise ValueError(f"cpu_bind {setting!r}: CPUs {outside} are not among this process's {sorted(available)}")
    return cpus


def bind_engine_thread(setting: str, threads: int) -> list[int] | None:
    """Pin the calling thread's OpenMP team of ``threads`` (see :func:`team_cpus`); returns the CPUs
    (to :func:`release` when the thread ends), or None where nothing was pinned. Only where the
    native kernels are in use (their OpenMP runtime is the one torch runs). A setting that cannot
    be applied here (CPUs this process may not use, a failed pinning) is logged and the engine
    runs unpinned."""
    from matrixinfer import kernels

    if not hasattr(os, "sched_getaffinity") or not kernels.available():
        return None
    with _lock:
        try:
            cpus = team_cpus(setting, threads, sorted(os.sched_getaffinity(0)), sorted(_claimed))
            if not cpus:
                return None
            kernels.bind_team(cpus, threads)
        except (OSError, ValueError) as exc:
            log.warning("not pinning the engine's threads: %s", exc)
            return None
        _claimed.update(cpus)
    log.info("engine thread's %d OpenMP threads pinned to CPUs %s (--cpu-bind %s)", threads, cpus, setting)
    return cpus


def release(cpus: list[int] | None) -> None:
    """The engine thread that held ``cpus`` has ended."""
    if cpus:
        with _lock:
            _claimed.difference_update(cpus)
