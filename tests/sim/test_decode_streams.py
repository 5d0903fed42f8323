"""Decode per-layer parts against the paper's per-stream and per-layer measurements [paper §4].

These are intermediate measurements, not inputs: they localise the decode gap. The two-stream
view (:func:`stream_split`) is derived from core counts and operator measurements only; it
reproduces the paper's core split and its microbatch gains, while both of its streams fall
short of the measured ~600 us per microbatch (see docs/simulator.md).
"""

import pytest

from matrixinfer.sim.decode import DecodeConfig, decode_step, stream_split
from matrixinfer.sim.paper import ascend_die
from matrixinfer.sim.shapes import deepseek_r1

SHAPES = deepseek_r1()
DIE = ascend_die()
# Batch 96 per NPU, 4K context, MTP on: the setting of the "about 600 us per stream" figure.
B96_CFG = DecodeConfig(batch_per_chip=96, context=4096 + 128)
B96 = decode_step(DIE, SHAPES, B96_CFG)
B96_NO_MTP = decode_step(DIE, SHAPES, DecodeConfig(batch_per_chip=96, context=4096 + 128, mtp=False))
B96_STREAMS = stream_split(DIE, SHAPES, B96_CFG)

# Each stream carries one microbatch (half the batch) per slot, two slots per layer:
# 2 x ~600 us + a short bubble = the measured 1,260 us per layer.
_SHORT = ("per microbatch the model's streams take ~476 us (attention, 17 of 24 matrix cores) and "
          "~454 us (MoE, 7 cores) against ~600 us each: both halves fall ~22% short, as does the "
          "layer, and no operator measurement in the notes supplies the difference")


@pytest.mark.xfail(strict=True, reason=_SHORT)
def test_attention_stream_matches_measured():
    assert B96_STREAMS.attention == pytest.approx(600e-6, rel=0.10)


@pytest.mark.xfail(strict=True, reason=_SHORT)
def test_moe_stream_matches_measured():
    assert B96_STREAMS.moe == pytest.approx(600e-6, rel=0.10)


def test_stream_split_matches_papers_core_allocation():
    # The paper pins the attention stream to 16 cube cores (+32 vector) and the MoE stream to 8
    # (+16) so that the two streams take about the same time. Balancing the model's streams
    # must land on that split.
    assert abs(B96_STREAMS.attention_cores - 16) <= 1
    assert B96_STREAMS.attention_cores + B96_STREAMS.moe_cores == 24


@pytest.mark.parametrize("batch, measured", [(64, 0.058), (96, 0.094), (128, 0.069)])
def test_pipeline_gain_matches_ablation(batch, measured):
    # The measured gains are small because each stream owns only part of the cores and every
    # microbatch re-reads the weights and pays its own fixed dispatch/combine cost. Three
    # points absolute: the paper's own three values spread 3.6 points.
    split = stream_split(DIE, SHAPES, DecodeConfig(batch_per_chip=batch, context=4096 + 128))
    assert split.gain == pytest.approx(measured, abs=0.03)


def test_step_model_agrees_with_stream_view():
    # The step applies the measured gain to the serial layer; the stream view derives it.
    assert B96.layer_time == pytest.approx(B96_STREAMS.layer, rel=0.05)


def test_no_split_without_matrix_core_partition():
    from matrixinfer.sim.hardware import H800
    from matrixinfer.sim.measurements import NVIDIA_PROFILE
    from matrixinfer.sim.operators import Die
    assert stream_split(Die(H800, NVIDIA_PROFILE), SHAPES, B96_CFG) is None


@pytest.mark.xfail(strict=True, reason="per-layer 938/603 us vs measured 1,260/874 us: " + _SHORT)
def test_layer_latency_with_and_without_mtp():
    assert B96.layer_time == pytest.approx(1260e-6, rel=0.10)
    assert B96_NO_MTP.layer_time == pytest.approx(874e-6, rel=0.10)


def test_mtp_per_layer_increase_has_the_measured_size():
    # 874 -> 1,260 us: MTP's second query token per sequence adds ~386 us per layer.
    assert B96.layer_time - B96_NO_MTP.layer_time == pytest.approx(386e-6, rel=0.15)
