"""`matrixinfer profile` on a tiny grid (schema), profile lookups, the profiled cost model and the
engine simulation (pure parts on synthetic profiles)."""

from __future__ import annotations

import json

import pytest

from matrixinfer.config import ModelConfig
from matrixinfer.engine.scheduler import Budget
from matrixinfer.model.default_model import RANDOM_CONFIG, write_random_model
from matrixinfer.sim.engine_sim import SimEngine, SimRequest, simulate
from matrixinfer.sim.local_cost import LocalCostModel
from matrixinfer.sim.local_ops import Dims, StepShape, work
from matrixinfer.sim.profile_data import SCHEMA, VERSION, Profile, pchip
from matrixinfer.sim.profile_focus import RecordingCostModel

EXPECTED_OPS = {"mla_prolog": 1, "mla_core_q1": 2, "mla_core_qk": 2, "mla_core_prefill": 1, "mla_epilogue": 1,
                "dense_mlp": 1, "shared_expert": 1, "routing": 1, "experts": 1, "rmsnorm": 1, "lm_head": 1,
                "sampling": 1, "layer_decode": 2, "layer_decode_dense": 2, "step_decode": 2, "step_prefill": 1,
                "engine_host": 1, "ems_get": 2, "ems_put": 2, "api_request": 2, "api_in": 2, "api_wake": 1,
                "api_token": 1, "api_gap": 1, "engine_cores": 1,
                "idle_wake": 2, "kv_transfer": 1, "serve_wait": 1, "serve_cpu": 1, "serve_cpu_prefill": 1,
                "serve_gap": 1}


def test_profile_command_writes_versioned_profile_on_tiny_grid(tmp_path, capsys):
    """The real command on the tiny grid (about 8 s: model load, engine, EMS server in process; the
    EP 2/4 dispatch/combine part spawns rank processes, ~30 s here, so it is left to the full run)."""
    from matrixinfer.cli import main

    model = write_random_model(tmp_path / "model")
    out = tmp_path / "prof.json"
    assert main(["profile", "--model", str(model), "--grid", "tiny", "--out", str(out), "--threads", "1",
                 "--device", "cpu", "--no-ep", "--disable-tqdm"]) == 0
    assert "wrote" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["version"] == VERSION
    meta = doc["meta"]
    for key in ("device", "device_name", "torch", "numpy", "python", "date", "threads", "grid", "load_avg_start"):
        assert meta[key] not in (None, ""), key
    assert meta["threads"] == 1 and meta["grid"] == "tiny"
    prof = Profile.load(out)
    assert {k: len(t.axes) for k, t in prof.ops.items()} == EXPECTED_OPS
    # differences of two timings, or a wait: >= 0
    differences = ("engine_host", "api_token", "idle_wake", "serve_wait", "api_wake", "serve_gap")
    assert all(s > 0 for name, t in prof.ops.items() for s in t.seconds if name not in differences)
    assert all(s >= 0 for name in differences for s in prof.ops[name].seconds)
    assert prof.roofline["gemm_flops"] > 1e8 and prof.roofline["stream_bw"] > 1e8
    # the stack's latency at each prompt length and load (0: alone; 1: beside one streaming request),
    # its way in a part of it
    assert sorted(prof.ops["api_request"].points) == sorted(prof.ops["api_in"].points) == [(8.0, 0.0), (8.0, 1.0)]
    assert all(i <= r for i, r in zip(prof.ops["api_in"].seconds, prof.ops["api_request"].seconds))
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("op,axis1") and len(rows) - 1 == sum(len(t.points) for t in prof.ops.values())
    # the validation's simulation runs from it (no server started)
    assert main(["simulate", "validate", "--profile", str(out), "--model", str(model), "--quick",
                 "--simulate-only"]) == 0
    assert "decode batch 4" in capsys.readouterr().out
    assert main(["simulate", "validate", "--profile", str(out), "--repeats", "0", "--simulate-only"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**doc, "version": 99}))
    assert main(["simulate", "validate", "--profile", str(bad), "--simulate-only"]) == 2
    assert "profile version 99" in capsys.readouterr().err


def test_pchip_is_monotone_between_points():
    xs, ys = [1.0, 2.0, 4.0, 8.0], [1.0, 1.1, 5.0, 5.2]
    vals = [pchip(xs, ys, 1 + i * 7 / 200) for i in range(201)]
    assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:]))
    assert max(vals) <= 5.2 + 1e-12 and pchip(xs, ys, 4.0) == pytest.approx(5.0)


def _synthetic(dims: Dims, gemm: float = 1e10, bw: float = 1e10, scale: float = 2.0) -> Profile:
    """Every operator measured at ``scale`` x its roofline time on a small grid; model-runner steps
    at the operator sum plus 1 ms (decode) or 2 ms (prefill); host work 0.1 ms + 10 us per sequence."""
    prof = Profile({"device": "cpu", "threads": 1, "cores": 1}, {"gemm_flops": gemm, "stream_bw": bw})
    roof = prof.roofline_time
    for op in ("mla_prolog", "mla_epilogue", "dense_mlp", "shared_expert", "routing", "rmsnorm", "lm_head",
               "sampling", "mla_core_prefill"):
        for t in (1, 8, 64, 512):
            prof.table(op, ("tokens",)).add((t,), scale * roof(*work(dims, op, (t,))))
    for tpe in (1, 8, 64):
        prof.table("experts", ("tokens_per_expert",)).add((tpe,), scale * roof(*work(dims, "experts", (tpe,))))
    for op in ("mla_core_q1", "mla_core_qk", "layer_decode", "layer_decode_dense"):
        for b in (1, 8, 64):
            for kv in (16, 256):
                prof.table(op, ("tokens", "kv_len")).add((b, kv), scale * roof(*work(dims, op, (b, kv))))
    for b in (1, 8, 64):
        for kv in (16, 256):
            ops = (dims.moe_layers * prof.ops["layer_decode"].interpolate((b, kv))
                   + dims.dense_layers * prof.ops["layer_decode_dense"].interpolate((b, kv))
                   + prof.ops["rmsnorm"].interpolate((b,)) + prof.ops["lm_head"].interpolate((b,)))
            prof.table("step_decode", ("tokens", "kv_len")).add((b, kv), ops + 1e-3)
    for t in (16, 128, 512):
        prof.table("step_prefill", ("tokens",)).add((t,), 0.05 * t / 512 + 2e-3)
    for b in (1, 64):
        prof.table("engine_host", ("tokens",)).add((b,), 1e-4 + 1e-5 * b)
        prof.table("api_token", ("streams",)).add((b,), 5e-5)
        prof.table("engine_cores", ("tokens",)).add((b,), 1.0)
    for n in (16, 256):
        prof.table("api_request", ("tokens",)).add((n,), 4e-3)
    return prof


def _dims() -> Dims:
    return Dims.of(ModelConfig.from_dict(RANDOM_CONFIG))


def test_lookup_says_where_each_cost_came_from():
    dims = _dims()
    prof = _synthetic(dims)
    inside = prof.lookup("mla_prolog", (32,), lambda p: work(dims, "mla_prolog", p))
    assert inside.source == "profile"
    lo, hi = prof.ops["mla_prolog"].seconds[1:3]
    assert lo <= inside.seconds <= hi
    outside = prof.lookup("mla_prolog", (4096,), lambda p: work(dims, "mla_prolog", p))
    assert outside.source == "roofline"  # 2x the roofline, the ratio at the nearest point (512)
    assert outside.seconds == pytest.approx(2.0 * prof.roofline_time(*work(dims, "mla_prolog", (4096,))))
    host = prof.lookup("engine_host", (128,))
    assert host.source == "linear" and host.seconds == pytest.approx(1e-4 + 1e-5 * 128)
    with pytest.raises(KeyError, match="no measurements of 'nope'"):
        prof.lookup("nope", (1,))


def test_step_is_operators_plus_measured_composition():
    dims = _dims()
    model = LocalCostModel(_synthetic(dims), dims)
    # at a profiled decode step the prediction reproduces it: operators + its measured residual (1 ms)
    shape = StepShape((1,) * 8, (256,) * 8)
    fwd = model.forward(shape, 8)
    measured = model.profile.ops["step_decode"].interpolate((8, 256))
    assert fwd.seconds == pytest.approx(measured)
    comp = [t for t in fwd.terms if t.op == "composition_decode"]
    assert comp and comp[0].seconds == pytest.approx(1e-3) and comp[0].source == "profile"
    step = model.step(shape, 8, 8)
    assert {t.op for t in step.terms} >= {"layer_decode", "sampling", "engine_host", "composition_decode",
                                          "api_token"}
    delivery = [t for t in step.terms if t.op == "api_token"]
    assert delivery[0].seconds == pytest.approx(8 * 5e-5)  # one core, kept busy: each new token's delivery adds
    model.cores = 2.0  # a second core outside the one-thread team takes the delivery beside the step
    assert [t.seconds for t in model.step(shape, 8, 8).terms if t.op == "api_token"] == [0.0]
    model.threads = 2.0  # a two-thread team holds both cores: the delivery lengthens its steps in full
    assert [t.seconds for t in model.step(shape, 8, 8).terms if t.op == "api_token"] == [pytest.approx(8 * 5e-5)]
    model.cores, model.threads = 1.0, 1.0
    assert step.seconds > fwd.seconds
    assert model.request_latency(100) == pytest.approx(4e-3)
    # a 300-token prompt chunk runs the per-operator path (beyond the one-call layer's 64 rows)
    pre = model.forward(StepShape((300,), (300,)), 1)
    assert {"mla_prolog", "mla_core_prefill", "experts", "composition_prefill"} <= {t.op for t in pre.terms}
    assert set(pre.sources()) <= {"profile", "roofline"}


def test_composition_is_interpolated_only_between_steps_of_its_own_path():
    """Prompt chunks of at most 64 tokens run the one-call layers, longer ones the per-operator
    path, whose dispatch overhead is several times larger: a 65-token chunk's overhead comes from
    the per-operator steps, not from an interpolation across the switch."""
    dims = _dims()
    assert dims.absorbed_prefill  # (the one-call layers take this model's prompt chunks)
    prof = _synthetic(dims)
    model = LocalCostModel(prof, dims)
    residual = {16: 1e-3, 64: 1e-3, 128: 10e-3, 512: 12e-3}
    table = prof.table("step_prefill", ("tokens",))
    table.points.clear()
    table.seconds.clear()
    for t, extra in residual.items():
        table.add((t,), model.forward_ops(StepShape((t,), (t,)), 1).seconds + extra)
    model = LocalCostModel(prof, dims)

    def overhead(t: int):
        return next(c for c in model.forward(StepShape((t,), (t,)), 1).terms if c.op == "composition_prefill")

    assert overhead(32).seconds == pytest.approx(1e-3) and overhead(32).source == "profile"
    assert overhead(65).seconds == pytest.approx(10e-3) and overhead(65).source == "nearest"
    assert 10e-3 < overhead(256).seconds < 12e-3
    assert model.forward(StepShape((65,), (65,)), 1).seconds > model.forward(StepShape((64,), (64,)), 1).seconds


def test_engine_simulation_follows_the_step_costs():
    dims = _dims()
    model = LocalCostModel(_synthetic(dims), dims)
    reqs = [SimRequest(i, 0.0, 32, 20) for i in range(4)]

    def engine() -> SimEngine:
        return SimEngine(model, Budget(1024, 128, 16), 1000)
    one = simulate(reqs, engine(), max_concurrency=1)
    four = simulate(reqs, engine(), max_concurrency=4)
    assert one.output_tokens == four.output_tokens == 80
    assert four.output_throughput > 1.5 * one.output_throughput  # batching pays on this profile
    decode_step = model.step(StepShape((1,), (40,)), 1, 1).seconds
    assert one.mean_tpot == pytest.approx(decode_step, rel=0.05)
    # one stream: the simulated engine is in steps for (nearly) the whole run
    assert one.steps >= 80 and 0.5 * one.duration < one.busy_seconds <= one.duration * (1 + 1e-9)
    assert one.busy_seconds / one.steps == pytest.approx(decode_step, rel=0.5)
    # P/D: the same requests; the KV moves in 5 ms and the first token reaches the client from the
    # decode instance once it holds the KV (the prefill worker hands the request off silently)
    pd = simulate(reqs, engine(), engine(), max_concurrency=1, transfer_s=lambda n: 5e-3)
    assert pd.output_tokens == 80 and pd.mean_ttft == pytest.approx(one.mean_ttft + 5e-3)
    assert pd.mean_tpot == pytest.approx(one.mean_tpot, rel=0.05)
    # two at once: the second's KV lands while the decode instance runs the first's step, and is
    # attached (its first token sent) only when that step ends
    two = simulate(reqs[:2], engine(), engine(), transfer_s=lambda n: 5e-3)
    first_prefill = model.step(StepShape((32,), (32,)), 1, 1, float("inf")).seconds
    assert two.ttft[0] == pytest.approx(first_prefill + 5e-3 + model.request_latency(32))
    second_prefill = model.step(StepShape((32,), (32,)), 1, 1).seconds  # right after the first: no idle
    kv_lands = first_prefill + second_prefill + 5e-3
    waited = two.ttft[1] - model.request_latency(32) - kv_lands
    decode_step = model.step(StepShape((1,), (40,)), 1, 1).seconds
    assert 0 < waited <= decode_step * 1.05


def _with_idle_wake(prof: Profile) -> Profile:
    """``idle_wake``: 1 ms for a decode step, 4 ms (5 ms idle) and 8 ms (100 ms idle) for a 64-token chunk."""
    for t, short, long in ((1, 1e-3, 1e-3), (64, 4e-3, 8e-3)):
        prof.table("idle_wake", ("tokens", "idle_s")).add((t, 0.005), short)
        prof.table("idle_wake", ("tokens", "idle_s")).add((t, 0.1), long)
    return prof


def test_step_after_an_idle_engine_costs_the_profiled_wake_up():
    dims = _dims()
    model = LocalCostModel(_with_idle_wake(_synthetic(dims)), dims)
    chunk = StepShape((64,), (64,))

    def wake(idle_s: float) -> list[float]:
        return [t.seconds for t in model.step(chunk, 1, 1, idle_s).terms if t.op == "idle_wake"]
    assert wake(0.0) == []  # back to back: the profiled step as it is
    assert wake(0.1) == [pytest.approx(8e-3)]
    assert wake(30.0) == [pytest.approx(8e-3)]  # longer than profiled: the longest gap's
    assert wake(0.0025) == [pytest.approx(2e-3)]  # half the shortest gap: half its cost
    assert model.step(chunk, 1, 1, 0.1).seconds == pytest.approx(model.step(chunk, 1, 1).seconds + 8e-3)
    assert wake(0.1) == [pytest.approx(8e-3)] and model.idle_wake(1, 0.1).seconds == pytest.approx(1e-3)
    old = LocalCostModel(_synthetic(dims), dims)  # a profile from before idle_wake: nothing added
    assert old.step(chunk, 1, 1, 0.1).seconds == pytest.approx(old.step(chunk, 1, 1).seconds)


def test_served_colocated_step_waits_its_profiled_share_and_a_pd_worker_does_not():
    dims = _dims()
    prof = _synthetic(dims)
    for streams, share in ((1, 0.0), (8, 0.04), (64, 0.2)):
        prof.table("serve_wait", ("streams",)).add((streams,), share)
    colocated, pd = LocalCostModel(prof, dims), LocalCostModel(prof, dims, in_api_process=False)
    old = LocalCostModel(_synthetic(dims), dims)  # a profile from before serve_wait: nothing added
    for b, share in ((1, 0.0), (8, 0.04), (64, 0.2)):
        shape = StepShape((1,) * b, (64,) * b)
        base = pd.step(shape, b, b).seconds
        assert old.step(shape, b, b).seconds == pytest.approx(base)
        step = colocated.step(shape, b, b)
        # the profiled step is the thread's CPU time; served, the step's wall time is that over 1 - share
        assert step.seconds == pytest.approx(base / (1.0 - share))
        assert [t.op for t in step.terms].count("serve_wait") == 1


def test_steps_beside_the_serving_stack_compute_at_the_profiled_ratio_in_both_deployments():
    dims = _dims()
    prof = _synthetic(dims)
    for streams, ratio in ((1, 1.2), (8, 1.3), (64, 0.9)):
        prof.table("serve_cpu", ("streams",)).add((streams,), ratio)
    prof.table("serve_cpu_prefill", ("tokens",)).add((256,), 1.05)
    old = LocalCostModel(_synthetic(dims), dims)  # a profile from before serve_cpu: nothing added
    for in_api in (True, False):
        model = LocalCostModel(prof, dims, in_api_process=in_api)
        plain = LocalCostModel(_synthetic(dims), dims, in_api_process=in_api)
        for b, ratio in ((1, 1.2), (8, 1.3), (64, 1.0)):  # below 1 (noise): nothing taken off
            shape = StepShape((1,) * b, (64,) * b)
            compute = sum(t.seconds for t in plain.step(shape, b, b).terms if t.op not in ("api_token", "serve_wait"))
            terms = model.step(shape, b, b).terms
            assert sum(t.seconds for t in terms if t.op == "serve_cpu") == pytest.approx(compute * (ratio - 1.0))
        chunk = StepShape((64,), (64,))  # a prompt step: the prompt steps' ratio
        compute = sum(t.seconds for t in plain.step(chunk, 1, 1).terms if t.op not in ("api_token", "serve_wait"))
        terms = model.step(chunk, 1, 1).terms
        assert sum(t.seconds for t in terms if t.op == "serve_cpu_prefill") == pytest.approx(compute * 0.05)
        one = StepShape((1,), (64,))
        assert old.step(one, 1, 1).seconds == pytest.approx(plain.step(one, 1, 1).seconds)


def test_pd_requests_add_the_profiled_pd_path_latency_and_colocated_ones_do_not():
    dims = _dims()
    prof = _synthetic(dims)
    for n, extra in ((16, 4e-3), (256, 6e-3)):
        prof.table("pd_request", ("tokens",)).add((n,), extra)
    colocated, pd = LocalCostModel(prof, dims), LocalCostModel(prof, dims, in_api_process=False)
    old = LocalCostModel(_synthetic(dims), dims, in_api_process=False)  # a profile from before pd_request
    for n, extra in ((16, 4e-3), (256, 6e-3)):
        assert old.request_latency(n) == pytest.approx(colocated.request_latency(n))
        assert pd.request_latency(n) == pytest.approx(colocated.request_latency(n) + extra)


def test_requests_that_find_the_engine_idle_wait_for_its_wake_up():
    """Two requests a second apart each find the engine idle: their prefill steps (and so TTFT)
    get the 100 ms gap's wake-up; the decode steps run back to back and do not."""
    dims = _dims()
    woken, plain = LocalCostModel(_with_idle_wake(_synthetic(dims)), dims), LocalCostModel(_synthetic(dims), dims)
    reqs = [SimRequest(0, 0.0, 64, 8), SimRequest(1, 1.0, 64, 8)]
    a = simulate(reqs, SimEngine(woken, Budget(1024, 128, 16), 1000))
    b = simulate(reqs, SimEngine(plain, Budget(1024, 128, 16), 1000))
    assert a.ttft == [pytest.approx(x + 8e-3) for x in b.ttft]
    assert a.tpot == [pytest.approx(x) for x in b.tpot]
    # one in flight, the next sent when the client has the last one's end: the engine idles only
    # for the stack's way out and in (4 ms), so the second wakes from that short a gap
    now = [SimRequest(0, 0.0, 64, 8), SimRequest(1, 0.0, 64, 8)]
    c = simulate(now, SimEngine(woken, Budget(1024, 128, 16), 1000), max_concurrency=1)
    d = simulate(now, SimEngine(plain, Budget(1024, 128, 16), 1000), max_concurrency=1)
    short = woken.idle_wake(64, plain.request_latency(64))
    assert short is not None and 0 < short.seconds < 8e-3
    assert c.ttft[0] == pytest.approx(d.ttft[0] + 8e-3) and c.ttft[1] == pytest.approx(d.ttft[1] + short.seconds)


def _with_api_wake(prof: Profile) -> Profile:
    """``api_wake``: 1 ms after 10 ms without a request, 3 ms after 1 s."""
    prof.table("api_wake", ("idle_s",)).add((0.01,), 1e-3)
    prof.table("api_wake", ("idle_s",)).add((1.0,), 3e-3)
    return prof


def test_a_request_that_finds_the_stack_idle_gets_its_profiled_wake_up():
    """Requests sent while another is in flight add nothing; one sent after the stack had no
    request for a while gets that gap's wake-up (the longest profiled beyond it, scaled down
    below the shortest); a profile from before api_wake adds nothing."""
    dims = _dims()
    model = LocalCostModel(_with_api_wake(_synthetic(dims)), dims)
    assert model.api_wake(0.0) is None and model.api_wake(1.0).seconds == pytest.approx(3e-3)
    assert model.api_wake(60.0).seconds == pytest.approx(3e-3) and model.api_wake(0.005).seconds == pytest.approx(5e-4)
    assert LocalCostModel(_synthetic(dims), dims).api_wake(1.0) is None
    woken, plain = model, LocalCostModel(_synthetic(dims), dims)

    def run(cost, reqs, **kw):
        return simulate(reqs, SimEngine(cost, Budget(1024, 128, 16), 1000), **kw)
    apart = [SimRequest(0, 0.0, 32, 4), SimRequest(1, 5.0, 32, 4)]  # each finds the stack idle (the first: always)
    a, b = run(woken, apart), run(plain, apart)
    assert a.ttft == [pytest.approx(x + 3e-3) for x in b.ttft] and a.tpot == pytest.approx(b.tpot)
    together = [SimRequest(0, 0.0, 32, 4), SimRequest(1, 0.0, 32, 4)]  # the second is sent while the first runs
    c, d = run(woken, together), run(plain, together)
    assert c.ttft[0] == pytest.approx(d.ttft[0] + 3e-3) and c.ttft[1] == pytest.approx(d.ttft[1])


def test_idle_wake_profile_measures_the_extra_time_after_an_idle_gap():
    """profile_idle against a step that takes 1 ms back to back and 4 ms more after 5 ms or more
    of idle: the table says about 4 ms at the long gap and nothing at the short one."""
    from matrixinfer.sim.profile_idle import profile_idle

    last = [0.0]

    def step_for(tokens: int):
        def step() -> None:
            import time
            cold = time.perf_counter() - last[0] > 0.005
            time.sleep(0.001 + (0.004 if cold else 0.0))
            last[0] = time.perf_counter()
        return step
    prof = Profile({}, {})
    assert list(profile_idle(step_for, (1, 16), (0.0005, 0.02), 3, prof.table)) == ["idle wake 1", "idle wake 16"]
    table = prof.ops["idle_wake"]
    assert table.axes == ("tokens", "idle_s") and len(table.points) == 4
    by_point = dict(zip(table.points, table.seconds))
    for t in (1.0, 16.0):
        assert 0.0025 < by_point[(t, 0.02)] < 0.012  # loose: a loaded machine stretches sleeps
        assert by_point[(t, 0.0005)] < 0.0025


def test_kv_transfer_comes_from_the_profile_when_it_has_one():
    dims = _dims()
    prof = _synthetic(dims)
    assert LocalCostModel(prof, dims).kv_transfer(160) is None  # older profiles: the caller's stand-in
    for t, s in ((16, 0.8e-3), (256, 1.1e-3), (1024, 2.6e-3)):
        prof.table("kv_transfer", ("tokens",)).add((t,), s)
    model = LocalCostModel(prof, dims)
    assert 0.8e-3 < model.kv_transfer(160) < 1.1e-3
    assert model.kv_transfer(2048) == pytest.approx(2.6e-3 + (2.6e-3 - 1.1e-3) * 1024 / 768)  # the last segment


def test_profiled_decode_steps_decode_new_tokens_each_time(tmp_path, monkeypatch):
    """Each repetition of a profiled decode step (the model runner's, and a one-call layer's) runs
    other tokens, as serving does: rerunning one token kept its experts in the cache."""
    import torch

    from matrixinfer.sim.profiler import GRIDS, Profiler

    prof = Profiler(write_random_model(tmp_path / "model"), torch.device("cpu"), GRIDS["tiny"], 1,
                    with_ems=False, with_engine=False, with_ep=False)
    runner = prof._runner()
    seen: list[list[int]] = []
    real = runner.execute

    def execute(chunks):
        seen.append([s.token_ids(s.num_computed, n)[-1] for s, n in chunks])
        return real(chunks)

    monkeypatch.setattr(runner, "execute", execute)
    step = prof._runner_step(2, 1, 32)
    for _ in range(4):
        step()
    assert len({tuple(ids) for ids in seen}) == 4 and len({t for ids in seen for t in ids}) >= 6
    embedded: list[torch.Tensor] = []
    real_embed = prof.model._embed
    monkeypatch.setattr(prof.model, "_embed", lambda ids, pos, meta: embedded.append(ids) or real_embed(ids, pos, meta))
    list(prof._attention_and_steps())
    single = {tuple(ids.tolist()) for ids in embedded if len(ids) == 1}  # batch 1's layers, every kv point
    assert len(single) > 2 * len(GRIDS["tiny"].kv_len)  # (one token per kv point before)


def test_hand_off_between_steps_is_time_the_engine_is_not_in_a_step():
    """With ``api_gap`` profiled (1 ms per token delivered), each decode step of 4 streams is
    followed by 4 ms before the next: the run lasts that much longer, the engine's step time does
    not change, and profiles without the table simulate as before."""
    dims = _dims()
    reqs = [SimRequest(i, 0.0, 32, 20) for i in range(4)]
    plain = LocalCostModel(_synthetic(dims), dims)
    prof = _synthetic(dims)
    for streams in (1.0, 64.0):
        prof.table("api_gap", ("streams",)).add((streams,), 1e-3)
    gapped = LocalCostModel(prof, dims)
    assert plain.handoff(4, 4) is None and gapped.handoff(4, 4).seconds == pytest.approx(4e-3)
    assert gapped.handoff(0, 4) is None  # a step that delivered nothing hands nothing off
    before = simulate(reqs, SimEngine(plain, Budget(1024, 128, 16), 1000), max_concurrency=4)
    after = simulate(reqs, SimEngine(gapped, Budget(1024, 128, 16), 1000), max_concurrency=4)
    assert after.steps == before.steps and after.busy_seconds == pytest.approx(before.busy_seconds)
    # every step samples 4 tokens (the prompt step samples each request's first): 4 ms after each
    assert after.duration - before.duration == pytest.approx(before.steps * 4e-3, rel=0.1)
    assert after.busy_seconds / after.duration < before.busy_seconds / before.duration


def test_colocated_hand_off_is_the_served_engines_where_profiled_and_a_pd_workers_the_stand_ins():
    dims = _dims()
    prof = _synthetic(dims)
    for streams in (1.0, 64.0):
        prof.table("api_gap", ("streams",)).add((streams,), 1e-3)
        prof.table("serve_gap", ("streams",)).add((streams,), 3e-3)
    colocated, pd = LocalCostModel(prof, dims), LocalCostModel(prof, dims, in_api_process=False)
    assert colocated.handoff(4, 4).seconds == pytest.approx(12e-3) and colocated.handoff(4, 4).op == "serve_gap"
    assert pd.handoff(4, 4).seconds == pytest.approx(4e-3) and pd.handoff(4, 4).op == "api_gap"


def _with_stack_load(prof: Profile) -> Profile:
    """``api_request`` by prompt length and load: 4 ms alone, 10 ms beside 8 streaming requests;
    its way in (``api_in``) 3 ms alone, 6 ms beside 8."""
    del prof.ops["api_request"]
    for n in (16, 256):
        for load, total, way_in in ((0, 4e-3, 3e-3), (8, 10e-3, 6e-3)):
            prof.table("api_request", ("tokens", "load")).add((n, load), total)
            prof.table("api_in", ("tokens", "load")).add((n, load), way_in)
    return prof


def test_the_stack_latency_grows_with_load_and_a_closed_loop_waits_for_it():
    """A request that finds others streaming gets the stack's latency at that load; the engine has
    a request its way in after the send; a closed-loop client sends its next request when it has
    the last one's end, so the engine idles for the way out and the next way in."""
    dims = _dims()
    model = LocalCostModel(_with_stack_load(_synthetic(dims)), dims)
    assert model.request_latency(32, 0) == pytest.approx(4e-3) and model.request_in(32, 0) == pytest.approx(3e-3)
    assert model.request_latency(32, 4) == pytest.approx(7e-3)  # interpolated between load 0 and 8
    assert model.request_latency(32, 8) == pytest.approx(10e-3) and model.request_in(32, 8) == pytest.approx(6e-3)
    # a P/D worker's model: no split (its pd_request is measured end to end)
    assert LocalCostModel(model.profile, dims, in_api_process=False).request_in(32, 8) == 0.0

    def run(reqs, cost=model, **kw):
        return simulate(reqs, SimEngine(cost, Budget(1024, 128, 16), 1000), **kw)
    alone = run([SimRequest(0, 0.0, 32, 4)])
    prefill = model.step(StepShape((32,), (32,)), 1, 1).seconds
    assert alone.ttft[0] == pytest.approx(prefill + 4e-3)
    # the second is sent while the first streams: its latency is looked up at load 1
    recorder = RecordingCostModel(model.profile, dims)
    run([SimRequest(0, 0.0, 32, 64), SimRequest(1, 0.01, 32, 4)], recorder)
    assert list(dict.fromkeys(p for name, p in recorder.seen if name in ("api_request", "api_in"))) == \
        [(32.0, 0.0), (32.0, 1.0)]
    # closed loop, one at a time: each request's engine time plus the stack's 4 ms in and out
    loop = run([SimRequest(i, 0.0, 32, 4) for i in range(3)], max_concurrency=1)
    assert loop.duration == pytest.approx(3 * (alone.busy_seconds + 4e-3))
    assert loop.ttft == [pytest.approx(alone.ttft[0])] * 3


def test_a_pd_worker_lone_request_after_idle_computes_at_its_profiled_ratio():
    """``serve_cpu_pd`` (idle seconds): a P/D decode worker's steps of a lone request that found
    the stack idle that long compute that much slower (the longest gap's beyond it); the colocated
    engine and batches of more than one take ``serve_cpu`` by streams."""
    dims = _dims()
    prof = _synthetic(dims)
    prof.table("serve_cpu", ("streams",)).add((1,), 1.0)
    prof.table("serve_cpu_prefill", ("tokens",)).add((256,), 1.0)
    for gap, ratio in ((0.0, 1.0), (0.4, 1.5)):
        prof.table("serve_cpu_pd", ("idle_s",)).add((gap,), ratio)
    pd, colocated = LocalCostModel(prof, dims, in_api_process=False), LocalCostModel(prof, dims)
    shape = StepShape((1,), (64,))
    plain = pd.forward(shape, 1).seconds + pd.op("sampling", 1.0).seconds + pd.op("engine_host", 1.0).seconds

    def slowed(model, running=1, lone=0.0):
        return sum(t.seconds for t in model.step(shape, 1, running, 0.0, lone).terms if t.op == "serve_cpu_pd")
    assert slowed(pd, lone=0.0) == pytest.approx(0.0)
    assert slowed(pd, lone=0.4) == pytest.approx(0.5 * plain) and slowed(pd, lone=30.0) == pytest.approx(0.5 * plain)
    assert slowed(pd, lone=0.2) == pytest.approx(0.25 * plain)  # interpolated
    assert slowed(colocated, lone=0.4) == 0.0 and slowed(pd, running=2, lone=0.4) == 0.0
