"""The first step after an idle engine, with the engine thread's OpenMP team pinned (``--cpu-bind``)
and not, in the same run (engine/cpu_affinity.py).

One plain engine (the demo model by default) is driven from two engine threads in turn: one left
to the scheduler, one whose team is pinned to the first ``threads`` CPUs. Each round, on each
thread: a ``--prompt-len``-token prefill after ``--idle-ms`` of idle (what a request meets at a
low request rate), ``--decode`` decode steps, and the same prefill again back to back (hot). For
each thread it prints the mean wall time of both prefills and of the decode steps, and the engine
thread's run-queue wait in them (``/proc/thread-self/schedstat``: runnable but not running), and
the pinned/unpinned ratio of the after-idle prefill.

    python benchmarks/idle_wake.py [--model DIR] [--rounds 10] [--idle-ms 100] [--prompt-len 160]
        [--decode 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import statistics
import threading
import time

import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.cpu_affinity import bind_engine_thread, release
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams


def schedstat() -> tuple[float, float]:
    """This thread's seconds on a CPU and waiting runnable for one."""
    with open("/proc/thread-self/schedstat") as f:
        on, wait = f.read().split()[:2]
    return int(on) / 1e9, int(wait) / 1e9


def timed_step(engine: LLMEngine) -> tuple[float, float]:
    _, w0 = schedstat()
    t0 = time.perf_counter()
    engine.step()
    wall = time.perf_counter() - t0
    return wall, schedstat()[1] - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--idle-ms", type=float, default=100.0)
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--decode", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="the engine's threads (default: every CPU)")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cpus)
    if threads < 2:
        raise SystemExit("a team of one thread has nothing to pin apart: run on 2 or more CPUs")
    torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", dtype="float32", kv_cache_memory=256 << 20,
                                    enable_prefix_caching=False))
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    count = [0]

    def request(max_tokens: int) -> None:
        count[0] += 1
        engine.add_request(f"r{count[0]}", [rng.randrange(10, vocab - 10) for _ in range(args.prompt_len)],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))

    results: dict[str, dict[str, list[tuple[float, float]]]] = {}

    def serve(name: str, pin: str, todo: queue.Queue, done: queue.Queue) -> None:
        torch.set_num_threads(threads)
        pinned = bind_engine_thread(pin, threads) if pin != "none" else None
        r = results[name] = {"after idle": [], "decode": [], "hot": []}
        while todo.get():
            time.sleep(args.idle_ms / 1e3)
            request(args.decode + 1)
            r["after idle"].append(timed_step(engine))
            for _ in range(args.decode):
                r["decode"].append(timed_step(engine))
            request(1)
            r["hot"].append(timed_step(engine))
            while engine.has_work():
                engine.step()
            done.put(True)
        release(pinned)

    runners = {}
    for name, pin in (("unpinned", "none"), ("pinned", ",".join(map(str, cpus[:threads])))):
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()
        th = threading.Thread(target=serve, args=(name, pin, todo, done), name=f"engine-{name}")
        th.start()
        runners[name] = (th, todo, done)
    for i in range(args.rounds + 1):  # the first round of each: warm-up, not counted
        for name, (_, todo, done) in runners.items():
            todo.put(True)
            done.get()
            if i == 0:
                for v in results[name].values():
                    v.clear()
        print(f"round {i}/{args.rounds}", end="\r", flush=True)
    print()
    for _, todo, _ in runners.values():
        todo.put(False)
    for th, _, _ in runners.values():
        th.join()
    print(f"demo model, {threads} threads, {args.prompt_len}-token prefill after {args.idle_ms:g} ms idle, "
          f"{args.rounds} rounds per thread, alternating")
    for name, r in results.items():
        print(f"{name:>9}: " + "  ".join(
            f"{kind} {statistics.fmean(w for w, _ in v) * 1e3:6.2f} ms (run-queue wait "
            f"{statistics.fmean(q for _, q in v) * 1e3:5.2f})" for kind, v in r.items()))
    a, b = (statistics.fmean(w for w, _ in results[n]["after idle"]) for n in ("unpinned", "pinned"))
    print(f"prefill after idle, pinned / unpinned: {b / a:.3f}")


if __name__ == "__main__":
    main()
