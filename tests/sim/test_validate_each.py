"""``simulate validate --profile-each``: which profile points a scenario reads (pure), and a real
re-measurement of them on the tiny model right before the scenario (about 8 s: model load, the
operators, the API probe's server and client processes)."""

from __future__ import annotations

import json
import os

import pytest

from matrixinfer.config import ModelConfig
from matrixinfer.engine.cpu_affinity import serving_threads
from matrixinfer.engine.scheduler import Budget
from matrixinfer.model.default_model import RANDOM_CONFIG, write_random_model
from matrixinfer.sim.engine_sim import SimEngine, SimRequest, simulate
from matrixinfer.sim.local_ops import Dims
from matrixinfer.sim.profile_data import Profile
from matrixinfer.sim.profile_focus import RecordingCostModel, bracket, focus_grid, merge
from matrixinfer.sim.profiler import GRIDS
from tests.sim.test_profile import _synthetic, _with_idle_wake


def _base(dims: Dims) -> Profile:
    prof = _with_idle_wake(_synthetic(dims))
    for t, s in ((16, 1e-3), (256, 2e-3), (1024, 3e-3)):
        prof.table("kv_transfer", ("tokens",)).add((t,), s)
    prof.table("ems_get", ("block_kib", "concurrency")).add((16, 1), 1e-4)  # read by no scenario
    prof.meta.update({"grid": "tiny", "date": "2026-11-30T12:00:00+00:00"})
    return prof


def test_bracket_takes_the_measured_values_around_the_lookups():
    assert bracket((1, 8, 64), [4, 5]) == (1, 8)
    assert bracket((1, 8, 64), [8]) == (8,)
    assert bracket((1, 8, 64), [2, 100]) == (1, 8, 64)  # beyond the ladder: its ends
    assert bracket((16, 256), [300]) == (256,)
    assert bracket((1, 8, 64), []) == ()


def test_focus_grid_covers_what_the_simulation_reads_and_nothing_else():
    """Four prompts of 24 tokens, 16 out each: the first prompt's chunk (24 rows) and the later
    decode batches (1-4 sequences of 25-39 keys) run as one-call layers, so the decode axes bracket
    1-24 rows (the base's 1, 8, 64) and 12-39 keys (16, 256); the token operators also get the
    prefill points (the composition overhead is a step minus its operators there); kv_transfer
    only for P/D."""
    dims = Dims.of(ModelConfig.from_dict(RANDOM_CONFIG))
    base = _base(dims)
    rec = RecordingCostModel(base, dims)
    assert rec.seen == []  # the composition set-up's own lookups are not the scenario's
    reqs = [SimRequest(i, 0.0, 24, 16) for i in range(4)]
    simulate(reqs, SimEngine(rec, Budget(1024, 128, 16), 1000), max_concurrency=4)
    grid = focus_grid(base, rec.seen, dims, pd=False)
    assert grid.batch == (1, 8, 64) and grid.kv_len == (16, 256)
    assert grid.prefill == (16, 128) and grid.tokens == (1, 8, 64, 512)  # covers the rows and the prefill points
    assert grid.host_batch == (1, 64) and grid.api_prompt == (16, 256) and grid.api_streams == (1, 64)
    assert grid.idle_tokens == (1, 64) and grid.idle_gaps == (0.005, 0.1)
    assert grid.kv_tokens == () and grid.ems_block_kib == () and grid.ep == ()
    assert grid.min_time == 0.002  # the base's grid (tiny) sets the repeats
    assert focus_grid(base, [*rec.seen, ("kv_transfer", (40.0,))], dims, pd=True).kv_tokens == (16, 256)
    assert grid.api_idle == GRIDS["full"].api_idle  # looked up, not in the base: the full grid's gaps
    base.table("api_wake", ("idle_s",)).add((0.01,), 1e-3)
    base.table("api_wake", ("idle_s",)).add((0.5,), 2e-3)
    assert focus_grid(base, rec.seen, dims, pd=False).api_idle == (0.01, 0.5)  # the base's own gaps, as floats
    assert focus_grid(base, [], dims, pd=False).api_idle == ()


def test_merge_replaces_whole_tables_and_keeps_the_rest():
    dims = Dims.of(ModelConfig.from_dict(RANDOM_CONFIG))
    base = _base(dims)
    fresh = Profile({"date": "2026-11-30T14:00:00+00:00", "threads": 2}, {"gemm_flops": 5e9, "stream_bw": 5e9})
    fresh.table("step_decode", ("tokens", "kv_len")).add((1, 16), 9e-3)
    merged = merge(base, fresh)
    assert merged.ops["step_decode"].points == [(1.0, 16.0)]  # no stale points mixed in
    assert merged.ops["ems_get"] is base.ops["ems_get"] and merged.roofline["gemm_flops"] == 5e9
    assert merged.meta["date"] == fresh.meta["date"] and merged.meta["base_date"] == base.meta["date"]


def test_profile_each_measures_what_a_scenario_reads_right_before_it(tmp_path, monkeypatch, capsys):
    """The real command, one small colocated scenario, simulate only: the scenario is simulated
    from tables measured after the run started, at the colocated engine's thread count."""
    from matrixinfer.cli import main
    from matrixinfer.sim import validate, validate_each

    model = write_random_model(tmp_path / "model")
    dims = Dims.of(ModelConfig.from_dict(RANDOM_CONFIG))
    base_path = tmp_path / "base.json"
    _base(dims).save(base_path)
    monkeypatch.setattr(validate, "scenarios", lambda quick: [
        validate.Scenario("decode batch 1", "colocated", 3, "8", "8", max_concurrency=1)])
    taken = []
    original = validate_each.FocusedProfiles.for_scenario

    def spy(self, sc):
        out = original(self, sc)
        taken.append(out)
        return out
    monkeypatch.setattr(validate_each.FocusedProfiles, "for_scenario", spy)
    result = tmp_path / "result.json"
    assert main(["simulate", "validate", "--profile", str(base_path), "--model", str(model), "--profile-each",
                 "--simulate-only", "--result-json", str(result)]) == 0
    out = capsys.readouterr().out
    assert "decode batch 1 [1/1]: profile of" in out and "taken 2026" in out
    (setup, fresh), = taken
    assert fresh.meta["threads"] == serving_threads(os.cpu_count() or 1) and fresh.meta["date"] > "2026-11-30T12:00:00"
    assert "kv_transfer" not in fresh.ops and "ems_get" not in fresh.ops  # not read by a colocated scenario
    used = setup.colocated.profile
    for op in ("step_decode", "layer_decode", "lm_head", "sampling", "engine_host", "api_token", "api_request",
               "idle_wake", "step_prefill"):
        assert used.ops[op] is fresh.ops[op], op
        assert all(s >= 0 for s in fresh.ops[op].seconds)
    assert used.ops["ems_get"].seconds == [pytest.approx(1e-4)]  # the base's, untouched
    # 1-8 rows (the 8-token prompts run as one-call layers too) and 8-16 keys, of the base's values
    assert fresh.ops["step_decode"].values(0) == [1.0, 8.0] and fresh.ops["step_decode"].values(1) == [16.0]
    assert fresh.ops["api_request"].values(0) == [16.0]
    doc = json.loads(result.read_text())
    assert doc["profile_each"] is True and doc["rows"][0]["simulated"] > 0
    # each repeat's fresh tables are kept with the result, to see what a simulated figure came from
    (kept,) = doc["fresh_profiles"]
    assert kept["scenario"] == "decode batch 1" and kept["repeat"] == 1
    assert kept["profile"]["ops"]["step_decode"]["seconds"] == fresh.ops["step_decode"].seconds


def test_engine_diagnostics_compare_the_served_step_with_the_simulated_one():
    """`simulate validate` prints the colocated engine's mean step and busy share, simulated against
    what the served engine's own counters give; nothing where the runs did not report them."""
    from matrixinfer.sim.engine_sim import SimResult
    from matrixinfer.sim.validate import engine_diagnostics, format_engine

    sims = [SimResult(duration=2.0, steps=100, busy_seconds=1.0), SimResult(duration=2.0, steps=100, busy_seconds=1.4)]
    runs = [{"output_throughput": 1.0, "step_ms": 15.0, "busy_share": 0.9}, {"output_throughput": 1.0}]
    d = engine_diagnostics(sims, runs)
    assert d == pytest.approx({"sim_step_ms": 12.0, "step_ms": 15.0, "sim_busy_share": 0.6, "busy_share": 0.9})
    text = format_engine([("decode batch 8", d)])
    assert "decode batch 8" in text and "12.00 ms vs   15.00 ms (-20.0%)" in text and "60% vs  90%" in text
    assert engine_diagnostics(sims, [{"output_throughput": 1.0}]) is None
