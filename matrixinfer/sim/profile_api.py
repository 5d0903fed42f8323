"""The serving stack's own cost: the HTTP API, the engine thread's hand-off and the benchmark client.

What a model step does not include but a client sees: parsing and validating the request, handing
it to the engine thread, each token's trip back (a cross-thread hand-off, an SSE chunk, the client
parsing it). Everything here runs the real ``AsyncEngine``, the real API app (uvicorn, as
``serve`` runs it) and the real ``matrixinfer bench`` client in its own process.

With a stand-in engine that produces tokens instantly (:func:`profile_api`):

- ``api_token`` (streams): CPU seconds (server and client processes together) per token streamed
  to ``streams`` concurrent clients: the CPU time of a run with ``tokens`` tokens per request minus
  that of the same requests with one token, over the extra tokens (start-up costs cancel). On a
  machine whose cores the engine keeps busy, that CPU time is taken from the engine's steps, so
  the cost model adds it to each step. (The stand-in's own per-step bookkeeping is counted too;
  the real engine's is also in ``engine_host``, a small double count.)
- ``api_gap`` (streams): wall seconds per token delivered that the engine thread spends between
  two steps while requests are running, measured in the same runs (the P/D workers' hand-off;
  the colocated engine's is ``serve_gap``, below).

With the real engine (:func:`profile_request`, :func:`profile_serve_wait`):

- ``api_request``, ``api_in`` (prompt tokens, load): a probe request's way in (send to the
  engine thread's hand-off; alone, also its pick-up) and, for ``api_request``, its way out too
  (the first-token step's end to the client's first chunk), alone and beside ``load`` streaming
  requests. On the 2-core AMD EPYC VM (2026-12-01): ``api_request`` 3.1/4.2 ms at 16/256 prompt
  tokens alone, 14 ms beside 64 streams. (The stand-in engine's TTFT less its step had put it at
  2.0-2.1 ms: the real engine's thread picks a request up and hands its token over slower.)
- ``api_wake`` (idle seconds): the same after the stack had no request for that long, over one
  sent right after the last (one kept-alive connection, gaps from milliseconds to a second,
  interleaved with gap 0): the event loop, the engine's thread and the client all sleep in
  between and wake for it. 0.2 ms after 5 ms, 0.4-0.9 ms after 30 ms to 1 s there.
- ``serve_wait``, ``serve_cpu``, ``serve_cpu_pd``, ``serve_cpu_prefill``, ``serve_gap``: real
  ``serve`` processes and the engine served from a thread here, against the same requests run on
  it without the API (:func:`profile_serve_wait`).

And with real P/D and colocated servers, the P/D path's own latency: ``pd_request``
(:func:`profile_pd_request`).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from matrixinfer.engine.outputs import EngineStats, FinishReason, RequestOutput
from matrixinfer.engine.sampling_params import SamplingParams

STEP_INTERVAL_S = 0.002  # the stand-in engine's step period (it sleeps, as a real step releases the GIL)


class InstantEngine:
    """The parts of :class:`~matrixinfer.engine.llm_engine.LLMEngine` that ``AsyncEngine`` uses: every
    step gives each running request its next token, without a model."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.model_id = "api-probe"
        self.max_model_len = self.max_seq_len = 1 << 20
        self.model = type("M", (), {"config": type("C", (), {"vocab_size": vocab_size})()})()
        self._running: dict[str, list[int]] = {}  # request id -> [prompt tokens, produced, wanted]

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._running[request_id] = [len(prompt_ids), 0, params.max_tokens]

    def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self._running)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running))

    def step(self) -> list[RequestOutput]:
        time.sleep(STEP_INTERVAL_S)
        outs = []
        for rid, state in list(self._running.items()):
            state[1] += 1
            done = state[1] >= state[2]
            outs.append(RequestOutput(request_id=rid, token_ids=[7], text=" x", finished=done,
                                      finish_reason=FinishReason.LENGTH if done else None,
                                      num_prompt_tokens=state[0], num_output_tokens=state[1]))
            if done:
                del self._running[rid]
        return outs


def _bench(url: str, prompts: int, input_len: int, output_len: int, concurrency: int, out: Path,
           seed: int = 0) -> dict:
    """Run ``matrixinfer bench`` against ``url``; its summary."""
    cmd = [sys.executable, "-m", "matrixinfer.cli", "bench", "--base-url", url, "--num-prompts", str(prompts),
           "--input-len", str(input_len), "--output-len", str(output_len), "--max-concurrency", str(concurrency),
           "--seed", str(seed), "--disable-tqdm", "--result-json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())["summary"]


def _one_at_a_time(url: str, prompt_len: int, output_len: int, seed: int, waits: list[float]
                   ) -> list[tuple[float, float]]:
    """Requests of ``prompt_len`` prompt and ``output_len`` output tokens (new prompts, ``seed``)
    on one kept-alive connection, as ``bench`` at concurrency 1 keeps: request ``i`` is sent
    ``waits[i]`` seconds after the last one ended. Each one's send time (``time.perf_counter``:
    the system's monotonic clock, which the served process reads too) and TTFT."""
    import asyncio

    import httpx

    from matrixinfer.bench.client import BenchConfig, resolve_model, send_request
    from matrixinfer.bench.datasets import parse_range, random_dataset

    async def run() -> list[tuple[float, float]]:
        config = BenchConfig(base_url=url, max_concurrency=1, show_progress=False)
        model, vocab = await resolve_model(config, None)
        specs = random_dataset(len(waits), parse_range(str(prompt_len)), parse_range(str(output_len)), vocab, seed=seed)
        out = []
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
            target, t0 = f"{url}/v1/completions", time.perf_counter()
            for spec, wait in zip(specs, waits):
                if wait:
                    await asyncio.sleep(wait)
                record = await send_request(client, target, config.headers(), model, spec, t0)
                if not record.success:
                    raise RuntimeError(f"the API probe's request failed: {record.error}")
                out.append((t0 + record.start, record.ttft))
        return out

    return asyncio.run(run())


def _wake_client(url: str, rounds: int, gaps: list[float]) -> None:
    """The client process of ``api_wake``: after two warm-up requests, ``rounds`` times, for each
    gap (0 first) in turn, waits that long after the last request's end, then sends one (16 prompt
    tokens, 2 output tokens); prints the TTFTs by gap as one JSON line."""
    order = [0.0, *gaps] * rounds
    sent = _one_at_a_time(url, 16, 2, 3, [0.0, 0.0, *order])[2:]
    ttft: dict[str, list[float]] = {str(g): [] for g in [0.0, *gaps]}
    for gap, (_, t) in zip(order, sent):
        ttft[str(gap)].append(t)
    print(json.dumps(ttft), flush=True)


PROBE_TOKENS = 2  # output tokens of api_request's probe requests (how the engine side tells them apart)


def _probe(url: str, count: int, prompt_len: int, seed: int, output_len: int = PROBE_TOKENS,
           gap: float = 0.0) -> list[tuple[float, float]]:
    """``count`` requests from a client process of their own (:func:`_one_at_a_time`), each sent
    ``gap`` seconds after the last ended: their send times and TTFTs."""
    cmd = [sys.executable, "-m", "matrixinfer.sim.profile_api", "probe", url, str(count), str(prompt_len), str(seed),
           str(output_len), str(gap)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return [(send, ttft) for send, ttft in json.loads(done.stdout.strip().splitlines()[-1])]


def _client(url: str, streams: int, lengths: list[int]) -> None:
    """The client process of ``api_token``: for each output length, one bench run of ``2 * streams``
    requests at concurrency ``streams``; prints ``start``, then ``done CPU_SECONDS`` per run, so the
    parent times its own CPU over exactly the same span (a warm-up run goes first)."""
    import asyncio
    import dataclasses

    from matrixinfer.bench.client import BenchConfig, resolve_model, run_benchmark
    from matrixinfer.bench.datasets import parse_range, random_dataset

    config = BenchConfig(base_url=url, max_concurrency=streams, show_progress=False)
    model, vocab = asyncio.run(resolve_model(config, None))
    config = dataclasses.replace(config, model=model)
    warm_up = random_dataset(2 * streams, parse_range("16"), parse_range("2"), vocab, seed=1)
    asyncio.run(run_benchmark(warm_up, config))
    for length in lengths:
        specs = random_dataset(2 * streams, parse_range("16"), parse_range(str(length)), vocab, seed=2)
        print("start", flush=True)
        t0 = time.process_time()
        asyncio.run(run_benchmark(specs, config))
        print(f"done {time.process_time() - t0}", flush=True)


@contextlib.contextmanager
def _served(backend) -> Iterator[str]:
    """The real API app over ``backend`` under uvicorn (as ``serve`` runs it) on a free loopback
    port, on a thread of this process; yields its URL and stops it (and the backend) after."""
    import uvicorn

    from matrixinfer.bench.launch import free_port
    from matrixinfer.config import ServeConfig
    from matrixinfer.serve.api_server import create_app
    from matrixinfer.serve.http_guard import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(create_app(backend), ServeConfig(port=port, log_level="error")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the API probe's server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        backend.shutdown()


class _StepClock:
    """Wraps an engine's ``step``: the tokens it delivered; the engine thread's gaps between steps
    while requests run (from the end of a step that delivered tokens and left work to the next
    step's start) and the tokens those steps delivered; and the duration of each step that gave a
    request its first token, in the order of those requests, and its start and end by request id."""

    def __init__(self, engine) -> None:
        self.engine, self.step = engine, engine.step
        self.tokens = 0
        self.gap_seconds, self.gap_tokens = 0.0, 0
        self.first_steps: list[float] = []
        self.first_at: dict[str, tuple[float, float]] = {}  # request id -> its first token's step (start, end)
        self._left: tuple[float, int] | None = None

    def reset(self) -> None:
        self.tokens, self.gap_seconds, self.gap_tokens = 0, 0.0, 0
        self.first_steps.clear()
        self.first_at.clear()

    def __call__(self) -> list[RequestOutput]:
        start = time.perf_counter()
        if self._left is not None:
            self.gap_seconds += start - self._left[0]
            self.gap_tokens += self._left[1]
        outs = self.step()
        end = time.perf_counter()
        tokens = sum(len(o.token_ids) for o in outs)
        self.tokens += tokens
        for o in outs:
            if o.num_output_tokens == 1:
                self.first_steps.append(end - start)
                self.first_at[o.request_id] = (start, end)
        self._left = (end, tokens) if tokens and self.engine.has_work() else None
        return outs


@contextlib.contextmanager
def _clocked(engine) -> Iterator[_StepClock]:
    """``engine.step`` wrapped in a :class:`_StepClock` for the block (the engine's thread calls it)."""
    clock = _StepClock(engine)
    engine.step = clock
    try:
        yield clock
    finally:
        del engine.step  # the class's own again


@contextlib.contextmanager
def _submissions(backend) -> Iterator[dict[str, float]]:
    """For the block, when the API handed each probe request (:data:`PROBE_TOKENS` output tokens)
    to ``backend``'s engine thread (``time.perf_counter``), by request id."""
    from matrixinfer.engine.commands import AddRequest

    put, times = backend._inbox.put, {}

    def record(command) -> None:
        if isinstance(command, AddRequest) and command.params.max_tokens == PROBE_TOKENS:
            times[command.request_id] = time.perf_counter()
        put(command)
    backend._inbox.put = record
    try:
        yield times
    finally:
        del backend._inbox.put  # the queue's own again


def _served_run(engine, url: str, result: Path, prompts: int, input_len: int, output_len: int, concurrency: int,
                seeds: tuple[int, int], backend, warm_up: bool = True) -> tuple[float, float, int, _StepClock]:
    """A warm-up bench run (``seeds[0]``; unless not ``warm_up``), then the measured one
    (``seeds[1]``) with the engine's steps clocked; the engine's step seconds, step CPU seconds and
    steps over the measured run."""
    if warm_up:
        _bench(url, prompts, input_len, output_len, concurrency, result, seeds[0])
    time.sleep(0.05)  # the loop's stats after the warm-up's last step
    before = backend.stats
    with _clocked(engine) as clock:
        _bench(url, prompts, input_len, output_len, concurrency, result, seeds[1])
        deadline = time.monotonic() + 5
        while backend.stats.running and time.monotonic() < deadline:  # the loop's last update
            time.sleep(0.01)
    after = backend.stats
    return (after.busy_seconds - before.busy_seconds, after.busy_cpu_seconds - before.busy_cpu_seconds,
            after.steps - before.steps, clock)


def _unserved(engine, specs, concurrency: int) -> tuple[float, int]:
    """Run ``specs`` on ``engine`` directly on this thread, ``concurrency`` in flight as ``bench``
    keeps them (the next sent when one finishes), greedy and exact length as ``bench`` asks; the
    engine thread's CPU seconds in steps and the steps it took."""
    queue = list(specs)
    running = 0
    cpu, steps = engine.busy_cpu_seconds, engine.steps
    n = 0
    while queue or running:
        while queue and running < concurrency:
            spec = queue.pop(0)
            engine.add_request(f"unserved-{n}", spec.prompt_ids,
                               SamplingParams(max_tokens=spec.output_len, temperature=0, ignore_eos=True))
            n, running = n + 1, running + 1
        running -= sum(out.finished for out in engine.step())
    return engine.busy_cpu_seconds - cpu, engine.steps - steps


BACKGROUND_PROMPT = 32  # prompt tokens of api_request's background streams


def background_tokens(load: int, max_len: int) -> int:
    """Output tokens of each of ``load`` background streams: enough to outlast the probes (the
    steps grow with the load; about 2 s of decoding on the 2-core VM at every load), within the
    model's ``max_len`` tokens."""
    return max(min(max(256, 16384 // max(load, 1)), max_len - BACKGROUND_PROMPT - 1), 1)


def _background(url: str, load: int, backend) -> subprocess.Popen:
    """A ``bench`` client streaming ``load`` long requests to ``url``; returns once all of them are
    decoding (so the probes find ``load`` streams running, none being prefilled)."""
    cmd = [sys.executable, "-m", "matrixinfer.cli", "bench", "--base-url", url, "--num-prompts", str(load),
           "--input-len", str(BACKGROUND_PROMPT), "--output-len", str(background_tokens(load, backend.max_model_len)),
           "--max-concurrency", str(load), "--seed", "77", "--disable-tqdm"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        stats = backend.stats
        if stats.running >= load and not stats.waiting and stats.queued_tokens <= stats.running:
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"api_request's background of {load} streams did not start (client exit "
                               f"status {proc.poll()})")
        time.sleep(0.01)


def _settle(backend) -> None:
    """Wait (up to 30 s) for the engine to drop the streams of a killed client."""
    deadline = time.monotonic() + 30
    while (backend.stats.running or backend.stats.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)


PROBES = 12  # api_request's requests per prompt length and load


def profile_request(engine, prompt_lens: tuple[int, ...], loads: tuple[int, ...], idle_gaps: tuple[float, ...],
                    idle_rounds: int, table) -> Iterator[str]:
    """Measure ``api_request`` and ``api_in`` at each prompt length and load, and ``api_wake`` at
    each of ``idle_gaps``, into ``table(name, axes)``: the real ``engine`` behind the real
    ``AsyncEngine`` and API app, lone probe requests (:data:`PROBE_TOKENS` output tokens, new
    prompts: no prefix cache hit) from a client in its own process, one sent when the last ended,
    after a warm-up.

    - ``api_in`` (tokens, load): from the client's send to the API's hand-off of the request to
      the engine thread, both on the system's monotonic clock; with no other request running
      (load 0) also the engine thread's pick-up, from that hand-off to the start of its step.
      Under load the thread is in another request's step when it arrives: that wait is the
      simulation's own (it runs the steps), so it is not in here.
    - ``api_request`` (tokens, load): ``api_in`` plus the way out: from the end of the step that
      gave the request its first token (clocked in the engine) to the client's first chunk.
    - load: ``load`` other requests stream meanwhile (a ``bench`` run of that many concurrent
      requests with long outputs, all decoding before the probes start): the API's event loop
      and the client share the cores with their tokens.
    - ``api_wake``: the wake client's requests after each idle gap, interleaved with ones sent
      right after the last (gap 0), the mean difference of TTFT minus the first-token step.

    The simulation admits a request to the engine ``api_in`` after its send and adds the rest of
    ``api_request`` to its first token and its last (a closed-loop client sends its next request
    only then)."""
    from matrixinfer.engine.async_engine import AsyncEngine

    backend = AsyncEngine(engine)
    with _served(backend) as url, tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "bench.json"
        _bench(url, 4, prompt_lens[0], 2, 1, result, seed=5)  # warm-up: a new server's first requests are slow
        with _clocked(engine) as clock, _submissions(backend) as handed:
            for load in loads:
                background = _background(url, load, backend) if load else None
                try:
                    for i, n in enumerate(prompt_lens):
                        clock.reset()
                        handed.clear()
                        sent = _probe(url, PROBES, n, 6 + 100 * load + i)
                        probes = sorted(handed, key=handed.__getitem__)
                        if len(probes) == len(sent) and all(rid in clock.first_at for rid in probes):
                            ways_in, ways = [], []
                            for (send, ttft), rid in zip(sent, probes):
                                start, end = clock.first_at[rid]
                                way_in = handed[rid] - send + (start - handed[rid] if not load else 0.0)
                                ways_in.append(way_in)
                                ways.append(way_in + send + ttft - end)
                            table("api_in", ("tokens", "load")).add((n, load), max(statistics.fmean(ways_in), 0.0))
                            table("api_request", ("tokens", "load")).add((n, load), max(statistics.fmean(ways), 0.0))
                        yield f"api request {n} tokens, load {load}"
                finally:
                    if background is not None:
                        background.kill()
                        background.wait()
                        _settle(backend)
            if idle_gaps and idle_rounds:
                clock.reset()
                cmd = [sys.executable, "-m", "matrixinfer.sim.profile_api", "wake", url, str(idle_rounds),
                       *(str(g) for g in idle_gaps)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
                ttft = json.loads(done.stdout.strip().splitlines()[-1])
                gaps = [0.0, *(float(g) for g in idle_gaps)]
                steps = clock.first_steps[2:]  # after the client's two warm-up requests: rounds x gaps, in order
                if len(steps) == idle_rounds * len(gaps):
                    stack = {g: statistics.fmean(ttft[str(g)][r] - steps[r * len(gaps) + j] for r in range(idle_rounds))
                             for j, g in enumerate(gaps)}
                    for g in gaps[1:]:
                        table("api_wake", ("idle_s",)).add((g,), max(stack[g] - stack[0.0], 0.0))
                yield "api wake"


PREFILL_PROMPT = 256  # serve_cpu_prefill's prompt length (one chunk)


def _cpu_ratio(cpu: float, steps: int, alone: float, alone_steps: int) -> float | None:
    """Served CPU seconds per step over unserved (None where either run has no steps or time)."""
    return (cpu / steps) / (alone / alone_steps) if cpu > 0 and steps and alone > 0 and alone_steps else None


def _deployed_step(server, deployment: str, run) -> tuple[float, float, int]:
    """``run()`` against a real ``serve`` process: its engine's step seconds, step CPU seconds and
    steps over the run, from its metrics (colocated: the engine's counters; P/D: the decode
    workers', which they report every 0.2 s)."""
    def read() -> tuple[float, float, float]:
        if deployment == "colocated":
            m = server.metrics()
            return (m["matrixinfer_engine_busy_seconds_total"], m["matrixinfer_engine_busy_cpu_seconds_total"],
                    m["matrixinfer_engine_steps_total"])
        from matrixinfer.bench.launch import instance_metrics

        m = instance_metrics(server._scrape(), by="role")
        return m["busy_seconds"]["decode"], m["busy_cpu_seconds"]["decode"], m["steps"]["decode"]
    if deployment == "pd":
        time.sleep(0.5)  # the workers' last reports
    before = read()
    run()
    if deployment == "pd":
        time.sleep(0.5)
    after = read()
    return after[0] - before[0], after[1] - before[1], int(after[2] - before[2])


PD_IDLE = (0.0, 0.1, 0.4)  # serve_cpu_pd's idle gaps before each lone request (seconds)


def _pd_lone(server, engine, tokens: int, gap: float) -> float | None:
    """A real P/D ``serve``'s decode worker's CPU per step over lone requests (12 of 16 prompt and
    ``tokens`` output tokens), each sent ``gap`` seconds after the last ended, over the same
    requests' steps run back to back on ``engine`` without the API; two rounds. None where the
    worker reported no steps."""
    from matrixinfer.bench.datasets import parse_range, random_dataset

    vocab = int(engine.model.config.vocab_size)
    cpu = alone = 0.0
    steps = alone_steps = 0
    for rnd in range(2):
        seed = 300 + 1000 * rnd + round(gap * 100)  # new prompts each run: no prefix cache hit
        _, u, n = _deployed_step(server, "pd", partial(_probe, server.url, 12, 16, seed, tokens, gap))
        cpu, steps = cpu + u, steps + n
        specs = random_dataset(12, parse_range("16"), parse_range(str(tokens)), vocab, seed=seed)
        if rnd == 0:
            _unserved(engine, specs, 1)  # warm-up
        u, n = _unserved(engine, specs, 1)
        alone, alone_steps = alone + u, alone_steps + n
    return _cpu_ratio(cpu, steps, alone, alone_steps)


def profile_serve_wait(engine, streams: tuple[int, ...], tokens: int, table, pd: bool = False) -> Iterator[str]:
    """Measure ``serve_wait``, ``serve_cpu`` (and ``serve_cpu_pd``), ``serve_gap`` and
    ``serve_cpu_prefill`` into ``table(name, axes)``. At each stream count, ``2 * streams`` (at
    least 16) requests of 16 prompt and ``tokens`` output tokens go from the ``bench`` client at
    concurrency ``streams`` (a warm-up run of the same shape first: its first steps allocate) to a
    real ``serve --colocated`` process of the engine's model and, for ``serve_gap``, to the real
    ``engine`` (an :class:`~matrixinfer.engine.llm_engine.LLMEngine`) behind the real
    ``AsyncEngine`` and API app in this process; then the same requests run on ``engine`` without
    the API, on this thread (the profile's engine thread), the same way; then all again, and the
    figures are over both rounds.

    - ``serve_wait``: the share of the served engine's step time (``busy_seconds``) that was not
      its thread's CPU time (``busy_cpu_seconds``): waits in the step for the interpreter lock the
      API's thread holds, or for a core.
    - ``serve_cpu``: the served engine thread's CPU seconds per step over the unserved run's: how
      much slower the same steps compute while the API server and the client work on the other
      cores (they share the caches and the memory bus). From the server process's own counters:
      the same engine served from a thread of this process came out 1.17-1.25x at one stream on
      the 2-core AMD EPYC VM (2026-12-01), where ``serve --colocated`` computed at 1.04-1.13x,
      as its served steps in the validation did.
    - ``serve_cpu_pd`` (idle seconds; with ``pd``): the same for a real P/D
      ``serve``'s decode worker (its own process; the router and the client beside it), lone
      requests each sent that long after the last ended (:data:`PD_IDLE`; with more streams, the
      worker decodes whatever the prefill worker has handed over so far, not the stream count).
      On the 2-core AMD EPYC VM (2026-12-01): 0.55-0.59 ms of CPU per step back to back, 0.71-0.75
      ms 0.4 s apart, for the whole request (the colocated server: 1-3% more).
    - ``serve_gap``: the served engine thread's wall seconds between two steps while requests run,
      per token the step before delivered (the hand-off to the API's event loop, and the waits
      for the interpreter lock its thread holds then), clocked in this process.

    ``serve_cpu_prefill`` (prompt tokens) is ``serve_cpu`` for prompt steps: lone requests of
    :data:`PREFILL_PROMPT` tokens and one output token, each prompt new (no prefix cache hit)."""
    from matrixinfer.bench.datasets import parse_range, random_dataset
    from matrixinfer.bench.launch import ServerProcess
    from matrixinfer.engine.async_engine import AsyncEngine

    vocab = int(engine.model.config.vocab_size)
    model = ["--model", str(engine.model_path)]
    servers = {"colocated": ServerProcess([*model, "--colocated"], timeout=300)}
    try:
        if pd:
            servers["pd"] = ServerProcess(model, timeout=300)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "bench.json"
            for c in streams:
                # at one stream, 2 requests of 64 tokens were too short a run (50 ms) to compare
                prompts = max(2 * c, 16)
                # the bench's requests (its dataset, seed 0), as served
                specs = random_dataset(prompts, parse_range("16"), parse_range(str(tokens)), vocab, seed=0)
                server = servers["colocated"]
                wall = cpu = alone = gap = 0.0
                steps = alone_steps = gap_tokens = 0
                for rnd in range(2):  # served, unserved, served, unserved: the machine moves between runs
                    if rnd == 0:
                        _bench(server.url, prompts, 16, tokens, c, result, 0)
                    w, u, n = _deployed_step(server, "colocated", partial(_bench, server.url, prompts, 16, tokens, c,
                                                                          result, 0))
                    wall, cpu, steps = wall + w, cpu + u, steps + n
                    backend = AsyncEngine(engine)
                    with _served(backend) as url:
                        _, _, _, clock = _served_run(engine, url, result, prompts, 16, tokens, c, (0, 0), backend,
                                                     warm_up=rnd == 0)
                    gap, gap_tokens = gap + clock.gap_seconds, gap_tokens + clock.gap_tokens
                    if rnd == 0:
                        _unserved(engine, specs, c)  # warm-up, as served
                    u, n = _unserved(engine, specs, c)
                    alone, alone_steps = alone + u, alone_steps + n
                if wall > 0:
                    table("serve_wait", ("streams",)).add((c,), min(max(1.0 - cpu / wall, 0.0), 1.0))
                if (ratio := _cpu_ratio(cpu, steps, alone, alone_steps)) is not None:
                    table("serve_cpu", ("streams",)).add((c,), ratio)
                if gap_tokens:
                    table("serve_gap", ("streams",)).add((c,), gap / gap_tokens)
                yield f"served engine x{c}"
            if pd:
                for gap in PD_IDLE:
                    if (ratio := _pd_lone(servers["pd"], engine, tokens, gap)) is not None:
                        table("serve_cpu_pd", ("idle_s",)).add((gap,), ratio)
                    yield f"P/D decode after {gap:g} s idle"
            n = PREFILL_PROMPT
            backend = AsyncEngine(engine)
            with _served(backend) as url:  # new prompts each run (seeds 1, 2; then 3, 4 unserved)
                _, cpu, steps, _ = _served_run(engine, url, result, 6, n, 1, 1, (1, 2), backend)
            _unserved(engine, random_dataset(6, parse_range(str(n)), parse_range("1"), vocab, seed=3), 1)
            alone, alone_steps = _unserved(engine, random_dataset(6, parse_range(str(n)), parse_range("1"), vocab,
                                                                  seed=4), 1)
            if (ratio := _cpu_ratio(cpu, steps, alone, alone_steps)) is not None:
                table("serve_cpu_prefill", ("tokens",)).add((n,), ratio)
            yield "served engine prefill"
    finally:
        for server in servers.values():
            server.stop()


def profile_api(model_path: Path, streams: tuple[int, ...], tokens: int, table) -> Iterator[str]:
    """Measure ``api_token`` and ``api_gap`` at each stream count into ``table(name, axes)`` (a
    :class:`~matrixinfer.sim.profile_data.Profile`'s ``table``), with the stand-in engine."""
    from matrixinfer.engine.async_engine import AsyncEngine
    from matrixinfer.model.tokenizer import Tokenizer

    cfg = json.loads((model_path / "config.json").read_text())
    engine = InstantEngine(Tokenizer(model_path), int(cfg["vocab_size"]))
    backend = AsyncEngine(engine)  # type: ignore[arg-type]
    with _served(backend) as url, _clocked(engine) as clock:
        for c in streams:  # T tokens per request minus 1 token per request: fixed costs cancel
            cmd = [sys.executable, "-m", "matrixinfer.sim.profile_api", url, str(c), str(tokens), "1"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            cpu, produced, gaps = [], [], []
            for line in proc.stdout:
                if line.startswith("start"):
                    clock.reset()
                    t0 = time.process_time()
                elif line.startswith("done"):
                    cpu.append(time.process_time() - t0 + float(line.split()[1]))
                    produced.append(clock.tokens)
                    gaps.append((clock.gap_seconds, clock.gap_tokens))
            if proc.wait(timeout=600) != 0 or len(cpu) != 2:
                raise RuntimeError(f"the API probe's client failed (exit status {proc.returncode})")
            if produced[0] > produced[1]:
                table("api_token", ("streams",)).add((c,), max(cpu[0] - cpu[1], 0.0) / (produced[0] - produced[1]))
            if gaps[0][1]:  # the run of `tokens` tokens per request (one token: no step leaves any running)
                table("api_gap", ("streams",)).add((c,), gaps[0][0] / gaps[0][1])
            yield f"api tokens x{c}"


def profile_pd_request(model_path: Path, prompt_lens: tuple[int, ...], rounds: int, table) -> Iterator[str]:
    """Measure ``pd_request`` at each prompt length into ``table(name, axes)``: what the P/D
    deployment adds to a lone request's TTFT over the colocated one. A real ``serve`` (P/D, the
    default) and a real ``serve --colocated`` run side by side; ``rounds`` times, alternating, the
    ``bench`` client sends each the same 8 requests one at a time (2 output tokens; new prompts
    each round, so neither server's prefix cache holds them); the value is the mean
    P/D TTFT minus the mean colocated TTFT (never below zero). The router's hop to the prefill
    worker, the decode worker's reservation, the KV hand-off and the token relay are in it; the
    prefill step and the stack's own latency (``api_request``) cancel."""
    from matrixinfer.bench.launch import ServerProcess

    model = ["--model", str(model_path)]
    servers = {"pd": ServerProcess(model, timeout=300)}
    try:
        servers["colocated"] = ServerProcess([*model, "--colocated"], timeout=300)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "bench.json"
            for n in prompt_lens:
                ttft: dict[str, list[float]] = {"pd": [], "colocated": []}
                for server in servers.values():  # warm-up: each shape's first steps allocate
                    _bench(server.url, 2, n, 2, 1, result, seed=100)
                for r in range(rounds):  # new prompts each round, the same for both: no prefix cache hit
                    for name, server in servers.items():
                        ttft[name].append(_bench(server.url, 8, n, 2, 1, result, seed=101 + r)["ttft"]["mean"] / 1e3)
                extra = sum(ttft["pd"]) / len(ttft["pd"]) - sum(ttft["colocated"]) / len(ttft["colocated"])
                table("pd_request", ("tokens",)).add((n,), max(extra, 0.0))
                yield f"P/D request {n} tokens"
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":  # the api_token client: URL STREAMS LENGTH...; api_wake's: wake URL ROUNDS GAP...;
    if sys.argv[1] == "wake":  # api_request's and serve_cpu_pd's: probe URL COUNT PROMPT_LEN SEED OUTPUT_LEN GAP
        _wake_client(sys.argv[2], int(sys.argv[3]), [float(g) for g in sys.argv[4:]])
    elif sys.argv[1] == "probe":
        count, gap = int(sys.argv[3]), float(sys.argv[7])
        print(json.dumps(_one_at_a_time(sys.argv[2], int(sys.argv[4]), int(sys.argv[6]), int(sys.argv[5]),
                                        [0.0] + [gap] * (count - 1))), flush=True)
    else:
        _client(sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3:]])
