"""``matrixinfer simulate validate``: the simulator against this machine's engine.

For each scenario the same requests (the bench's own dataset and arrival functions, same seeds)
are simulated from a profile taken here and then measured with ``matrixinfer bench``'s client
against a real ``matrixinfer serve`` (``--colocated``, and the default P/D deployment). The table
gives both figures, the error and the bar (10% colocated, 15% P/D), and for each simulated figure
the share of step time that came from interpolated profile points (the rest from the scaled
roofline or the nearest measurement).

With ``--profile-each`` (the default when no ``--profile`` is given) every scenario, and every
repeat of it, is simulated from operator points measured right before its measured run: the
machine's speed here drifts by up to 2x over minutes, more than the bar, so a profile and a
measurement minutes apart disagree whatever the model does (:mod:`matrixinfer.sim.profile_focus`).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from matrixinfer.config import EngineConfig, ModelConfig
from matrixinfer.engine.scheduler import Budget
from matrixinfer.sim.engine_sim import SimEngine, SimRequest, SimResult, simulate
from matrixinfer.sim.local_cost import LocalCostModel
from matrixinfer.sim.local_ops import Dims
from matrixinfer.sim.profile_data import Profile

COLOCATED_BAR, PD_BAR = 0.10, 0.15


@dataclass(frozen=True)
class Scenario:
    """One bench run: the dataset, the load (rate or concurrency) and the figures it checks."""

    name: str
    deployment: str  # "colocated" or "pd"
    num_prompts: int
    input_len: str
    output_len: str
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    figures: tuple[str, ...] = ("output_throughput",)


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("decode batch 4", "colocated", 8, "32", "16", max_concurrency=4),
                Scenario("rate 4/s", "colocated", 8, "32:64", "8:16", request_rate=4.0, figures=("ttft", "tpot"))]
    # at least 16 requests and 4 waves of the batch (1-6 s of decoding here: runs of 0.3 s, 4
    # requests at batch 1, moved 15% between two repeats); 30 s of arrivals at 2/s, 15 s at 8/s
    out = [Scenario(f"decode batch {b}", "colocated", max(16, 4 * b), "32", "128", max_concurrency=b)
           for b in (1, 8, 32, 64)]
    out += [Scenario(f"rate {r:g}/s", "colocated", n, "64:256", "32:128", request_rate=r, figures=("ttft", "tpot"))
            for r, n in ((2.0, 60), (8.0, 120))]
    out.append(Scenario("P/D rate 2/s", "pd", 40, "64:256", "32:128", request_rate=2.0,
                        figures=("ttft", "tpot", "output_throughput")))
    return out


@dataclass
class Row:
    scenario: str
    deployment: str
    figure: str
    simulated: float
    measured: float | None = None
    profile_share: float = 1.0
    spread: float | None = None  # (max - min) / mean of the measured repeats: the noise floor
    sim_spread: float | None = None  # the same over the simulated repeats (each from its own profile)
    repeats: list[tuple[float, float | None]] = field(default_factory=list)  # (simulated, measured) per repeat

    @property
    def error(self) -> float | None:
        return None if self.measured in (None, 0) else (self.simulated - self.measured) / self.measured

    @property
    def bar(self) -> float:
        return COLOCATED_BAR if self.deployment == "colocated" else PD_BAR


@dataclass
class Setup:
    """What the simulation needs to know about the deployment: costs per thread count, budgets."""

    model_path: Path
    config: ModelConfig
    colocated: LocalCostModel
    pd: LocalCostModel
    notes: list[str] = field(default_factory=list)


def _specs(sc: Scenario, vocab: int):
    from matrixinfer.bench import datasets

    return datasets.random_dataset(sc.num_prompts, datasets.parse_range(sc.input_len),
                                   datasets.parse_range(sc.output_len), vocab, seed=0)


def _engine(cost: LocalCostModel, cfg: ModelConfig, ecfg: EngineConfig) -> SimEngine:
    from matrixinfer.engine.model_runner import available_host_memory

    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers or 0)
    per_block = ecfg.block_size * layers * cfg.kv_cache_dim * 4  # float32 on the CPU
    # the model runner's formula: the KV budget over the bytes of one block
    budget = ecfg.kv_cache_memory or int(available_host_memory() * ecfg.kv_cache_fraction)
    return SimEngine(cost, Budget(ecfg.max_num_batched_tokens, ecfg.max_num_seqs, ecfg.block_size),
                     budget // per_block)


def simulate_scenario(sc: Scenario, setup: Setup) -> tuple[SimResult, float]:
    """Simulated result and the share of simulated step time from interpolated profile points."""
    from matrixinfer.bench.datasets import arrival_offsets

    cfg = setup.config
    specs = _specs(sc, cfg.vocab_size)
    offsets = arrival_offsets(len(specs), sc.request_rate, 0)
    reqs = [SimRequest(i, off, s.prompt_len, s.output_len) for i, (s, off) in enumerate(zip(specs, offsets))]
    ecfg = EngineConfig()
    if sc.deployment == "colocated":
        eng = _engine(setup.colocated, cfg, ecfg)
        res = simulate(reqs, eng, max_concurrency=sc.max_concurrency)
        engines = [eng]
    else:
        pre, dec = _engine(setup.pd, cfg, ecfg), _engine(setup.pd, cfg, ecfg)
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers or 0)
        per_token = layers * cfg.kv_cache_dim * 4

        def transfer(n: int) -> float:
            profiled = setup.pd.kv_transfer(n)
            if profiled is not None:
                return profiled
            kib = per_token * ecfg.block_size / 1024  # older profiles: EMS gets per block as a stand-in
            blocks = -(-n // ecfg.block_size)
            return blocks * setup.pd.profile.lookup("ems_get", (kib, 1.0)).seconds
        res = simulate(reqs, pre, dec, sc.max_concurrency, transfer)
        engines = [pre, dec]
    shares: dict[str, float] = defaultdict(float)
    for e in engines:
        for source, seconds in e.source_seconds.items():
            shares[source] += seconds
    total = sum(shares.values()) or 1.0
    return res, shares["profile"] / total


def _figure(res, name: str) -> float:
    if name == "output_throughput":
        return res.output_throughput
    value = res.mean_ttft if name == "ttft" else res.mean_tpot
    return value * 1e3  # ms


def measure_scenario(sc: Scenario, model_path: Path | None) -> dict[str, float]:
    """Run the bench client against a fresh ``matrixinfer serve`` of this scenario's deployment."""
    from matrixinfer.bench.client import BenchConfig, resolve_model, run_benchmark
    from matrixinfer.bench.launch import ServerProcess
    from matrixinfer.bench.metrics import summarize

    args = (["--model", str(model_path)] if model_path else []) + \
        (["--colocated"] if sc.deployment == "colocated" else [])
    server = ServerProcess(args, timeout=300)
    try:
        config = BenchConfig(base_url=server.url, request_rate=sc.request_rate,
                             max_concurrency=sc.max_concurrency, seed=0, show_progress=False)
        model, vocab = asyncio.run(resolve_model(config, None))
        from dataclasses import replace
        config = replace(config, model=model)
        records, duration = asyncio.run(run_benchmark(_specs(sc, vocab), config))
        engine = server.metrics() if sc.deployment == "colocated" else {}
    finally:
        server.stop()
    s = summarize(records, duration)
    if s.completed < sc.num_prompts:
        raise RuntimeError(f"{sc.name}: only {s.completed} of {sc.num_prompts} requests completed")
    out = {"output_throughput": s.output_throughput, "ttft": s.ttft.mean, "tpot": s.tpot.mean}  # ms
    busy, steps = engine.get("matrixinfer_engine_busy_seconds_total"), engine.get("matrixinfer_engine_steps_total")
    if busy is not None and steps:  # (a fresh server: its counters are this run's)
        out.update(step_ms=busy / steps * 1e3, busy_share=busy / duration)
    return out


def engine_diagnostics(sims: list[SimResult], runs: list[dict[str, float]]) -> dict[str, float] | None:
    """The colocated engine's mean step time and busy share while serving, simulated (the mean over
    the repeats) against measured (the engine's own counters, ``engine_busy_seconds`` over
    ``engine_steps`` and over the run): which side of an error is the step's cost and which the
    engine's waiting. None where the run did not report them."""
    measured = [r for r in runs if "step_ms" in r]
    if not measured or not all(res.steps and res.duration for res in sims):
        return None
    n, m = len(sims), len(measured)
    return {"sim_step_ms": sum(res.busy_seconds / res.steps for res in sims) / n * 1e3,
            "step_ms": sum(r["step_ms"] for r in measured) / m,
            "sim_busy_share": sum(res.busy_seconds / res.duration for res in sims) / n,
            "busy_share": sum(r["busy_share"] for r in measured) / m}


def format_engine(diags: list[tuple[str, dict[str, float]]]) -> str:
    lines = ["engine while serving (colocated): mean step, simulated vs measured, and the share of the run "
             "the engine was in steps"]
    for name, d in diags:
        err = (d["sim_step_ms"] - d["step_ms"]) / d["step_ms"]
        lines.append(f"  {name:<16} step {d['sim_step_ms']:7.2f} ms vs {d['step_ms']:7.2f} ms ({err:+.1%})   "
                     f"busy {d['sim_busy_share']:4.0%} vs {d['busy_share']:4.0%}")
    return "\n".join(lines)


def load_setup(profile_path: Path, model: str | None) -> Setup:
    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.sim.profiler import deployment_threads

    model_path = Path(model) if model else default_model_path()
    cfg = ModelConfig.from_dict(json.loads((model_path / "config.json").read_text()))
    dims = Dims.of(cfg)
    colocated = Profile.load(profile_path)
    notes = []
    cores = os.cpu_count() or 1
    colocated_threads, pd_threads = deployment_threads("colocated", cores), deployment_threads("pd", cores)
    if colocated.meta.get("threads") != colocated_threads:
        notes.append(f"the colocated engine runs {colocated_threads} thread(s); {profile_path} was taken with "
                     f"{colocated.meta.get('threads')}")
    pd_path = profile_path.with_name(f"{profile_path.stem}.t{pd_threads}{profile_path.suffix}")
    pd = Profile.load(pd_path) if pd_path.exists() else colocated
    if pd is colocated and pd_threads != colocated.meta.get("threads"):
        notes.append(f"no {pd_path.name}: the P/D workers ({pd_threads} thread(s) each) are simulated "
                     f"from the {colocated.meta.get('threads')}-thread profile")
    for prof, path in ((colocated, profile_path), (pd, pd_path)):
        if "kv_transfer" not in prof.ops and prof is pd:
            notes.append(f"{path.name} has no kv_transfer: the P/D KV transfer is simulated as EMS gets per block")
        if "idle_wake" not in prof.ops:
            notes.append(f"{path.name} has no idle_wake (taken before it was profiled): steps after an idle "
                         "engine are simulated as back-to-back steps")
    return Setup(model_path, cfg, LocalCostModel(colocated, dims), LocalCostModel(pd, dims, in_api_process=False),
                 notes)


def format_rows(rows: list[Row]) -> str:
    units = {"output_throughput": "tok/s", "ttft": "ms", "tpot": "ms"}
    lines = [f"{'deployment':<10} {'scenario':<16} {'figure':<18} {'simulated':>10} {'measured':>10} "
             f"{'error':>8} {'bar':>5}  ok   profile  spread  sim spread", "-" * 120]
    for r in rows:
        meas = "-" if r.measured is None else f"{r.measured:>10.1f}"
        err = "-" if r.error is None else f"{r.error:+.1%}"
        ok = "-" if r.error is None else ("yes" if abs(r.error) <= r.bar else "NO")
        lines.append(f"{r.deployment:<10} {r.scenario:<16} {r.figure + ' ' + units[r.figure]:<18} "
                     f"{r.simulated:>10.1f} {meas:>10} {err:>8} {r.bar:>5.0%}  {ok:<4} {r.profile_share:>7.0%}  "
                     + f"{'-' if r.spread is None else f'{r.spread:.0%}':<6}  "
                     + ("-" if r.sim_spread is None else f"{r.sim_spread:.0%}"))
    judged = [r for r in rows if r.error is not None]
    if judged:
        held = sum(abs(r.error) <= r.bar for r in judged)  # type: ignore[arg-type]
        lines.append("-" * 120)
        lines.append(f"{held}/{len(judged)} figures within their bar (colocated 10%, P/D 15%)")
    return "\n".join(lines)


def _spread(values: list[float]) -> float | None:
    m = sum(values) / len(values)
    return (max(values) - min(values)) / m if len(values) > 1 and m else None


def run_validation(args) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    each = args.profile_each or args.profile is None
    if each:
        from matrixinfer.sim.validate_each import FocusedProfiles

        focused = FocusedProfiles.start(Path(args.profile) if args.profile else None, args.model)
        setup = focused.setup
    else:
        setup = load_setup(Path(args.profile), args.model)
    for note in setup.notes:
        print(f"note: {note}")
    base = setup.colocated.profile.meta
    print(f"base profile {args.profile or '(small grid, taken now)'}: {base.get('device_name')}, taken "
          f"{base.get('date')} at load average {base.get('load_avg_start', 0):.1f}; load average now "
          f"{os.getloadavg()[0]:.1f}" + ("; each scenario re-profiles what it reads before it is measured"
                                          if each else ""))
    rows: list[Row] = []
    diags: list[tuple[str, dict[str, float]]] = []
    fresh_profiles: list[dict] = []  # --profile-each: what each repeat was simulated from, for the result JSON
    for sc in scenarios(args.quick):
        if sc.deployment == "pd" and args.skip_pd:
            continue
        sims: list[tuple[SimResult, float]] = []
        runs: list[dict[str, float]] = []
        for r in range(args.repeats if each else 1):
            if each:
                sc_setup, fresh = focused.for_scenario(sc)
                fresh_profiles.append({"scenario": sc.name, "repeat": r + 1, "profile": fresh.to_json()})
                meta, points = fresh.meta, sum(len(t.points) for t in fresh.ops.values())
                print(f"  {sc.name} [{r + 1}/{args.repeats}]: profile of {points} points ({meta['threads']} "
                      f"thread(s)) taken {meta['date']} in {meta['wall_s']} s, load average "
                      f"{meta['load_avg_start']:.1f} -> {meta['load_avg_end']:.1f}", flush=True)
                sims.append(simulate_scenario(sc, sc_setup))
                if not args.simulate_only:
                    runs.append(measure_scenario(sc, setup.model_path))
            else:
                sims.append(simulate_scenario(sc, setup))
                if not args.simulate_only:
                    runs = [measure_scenario(sc, setup.model_path) for _ in range(args.repeats)]
        share = sum(sh for _, sh in sims) / len(sims)
        diag = engine_diagnostics([res for res, _ in sims], runs)
        if diag is not None:
            diags.append((sc.name, diag))
        for fig in sc.figures:
            simulated = [_figure(res, fig) for res, _ in sims]
            measured = [run[fig] for run in runs]
            m = sum(measured) / len(measured) if measured else None
            pairs: list[tuple[float, float | None]] = (
                list(zip(simulated, measured)) if each else [(simulated[0], v) for v in measured])
            rows.append(Row(sc.name, sc.deployment, fig, sum(simulated) / len(simulated), m, share,
                            _spread(measured) if measured else None, _spread(simulated), pairs))
        print(f"  {sc.name}: done (load average {os.getloadavg()[0]:.1f})", flush=True)
    print(format_rows(rows))
    if diags:
        print(format_engine(diags))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(
            {"profile": args.profile, "profile_each": each, "load_avg_end": os.getloadavg()[0], "notes": setup.notes,
             "rows": [{**r.__dict__, "error": r.error, "bar": r.bar} for r in rows],
             "engine": [{"scenario": name, **d} for name, d in diags], "fresh_profiles": fresh_profiles}, indent=1))
    return 0
