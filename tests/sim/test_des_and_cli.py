"""DES agrees with the step model at steady state; the CLI commands run end to end."""

import pytest

from matrixinfer.cli import main
from matrixinfer.sim.des import simulate
from matrixinfer.sim.paper import paper_decode
from matrixinfer.sim.scenarios import paper_decode_load
from matrixinfer.sim.shapes import deepseek_r1


def test_des_matches_step_model_at_steady_state():
    shapes = deepseek_r1()
    dep, wl = paper_decode_load(shapes)
    res = simulate(dep, wl, duration_s=40.0, warmup_s=15.0, tpot_slo=0.05)
    step = paper_decode(shapes, 96, 4096, 256)
    assert res.mean_decode_batch == pytest.approx(96 * 160, rel=0.02)
    assert res.output_tok_s_per_decode_chip == pytest.approx(step.tokens_per_s_per_chip, rel=0.05)
    assert res.tpot_p50 == pytest.approx(step.tpot, rel=0.10)
    assert res.goodput_rps > 0


def test_cli_paper_plan_sweep(tmp_path, capsys):
    assert main(["simulate", "paper", "--nvidia"]) == 0
    out = capsys.readouterr().out
    assert "perfect expert balance" in out and "H800" in out and "decode" in out
    assert main(["plan", "--hardware", "cm384", "--ttft-ms", "2500", "--tpot-ms", "50",
                 "--workload", "4096/256/0.5", "--price-per-hour", "2"]) == 0
    assert "recommended" in capsys.readouterr().out
    assert main(["plan", "--hardware", "nope", "--ttft-ms", "1", "--tpot-ms", "1",
                 "--workload", "1/1"]) == 2
    assert main(["simulate", "sweep", "--hardware", "cm384", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "sweep.csv").read_text().startswith("hardware,")
