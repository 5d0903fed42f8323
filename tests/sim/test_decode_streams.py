"""Decode per-layer parts against the paper's per-stream and per-layer measurements [paper §4].

These are intermediate measurements, not inputs: they localise the decode gap. The attention
stream agrees; the MoE stream and the per-layer latency do not (see docs/simulator.md).
"""

import pytest

from matrixinfer.sim.decode import DecodeConfig, decode_step
from matrixinfer.sim.paper import ascend_die
from matrixinfer.sim.shapes import deepseek_r1

SHAPES = deepseek_r1()
# Batch 96 per NPU, 4K context, MTP on: the setting of the "about 600 us per stream" figure.
B96 = decode_step(ascend_die(), SHAPES, DecodeConfig(batch_per_chip=96, context=4096 + 128))
B96_NO_MTP = decode_step(ascend_die(), SHAPES,
                         DecodeConfig(batch_per_chip=96, context=4096 + 128, mtp=False))

_MOE = ("MoE path ~416 us vs the measured ~600 us: gate, dispatch/combine from the measured table "
        "and the expert GEMM at 80% of INT8 peak leave ~2 us per token per die unexplained")


def _path(r, parts):
    return sum(r.breakdown[p] for p in parts)


def test_attention_stream_matches_measured():
    attn = _path(B96, ("attn_proj", "attn_core"))
    assert attn == pytest.approx(600e-6, rel=0.10)


@pytest.mark.xfail(strict=True, reason=_MOE)
def test_moe_stream_matches_measured():
    moe = _path(B96, ("gate", "dispatch", "experts", "combine"))
    assert moe == pytest.approx(600e-6, rel=0.10)


@pytest.mark.xfail(strict=True, reason="per-layer 938/603 us vs measured 1,260/874 us: " + _MOE)
def test_layer_latency_with_and_without_mtp():
    assert B96.layer_time == pytest.approx(1260e-6, rel=0.10)
    assert B96_NO_MTP.layer_time == pytest.approx(874e-6, rel=0.10)


def test_mtp_per_layer_increase_has_the_measured_size():
    # 874 -> 1,260 us: MTP's second query token per sequence adds ~386 us per layer.
    assert B96.layer_time - B96_NO_MTP.layer_time == pytest.approx(386e-6, rel=0.15)
