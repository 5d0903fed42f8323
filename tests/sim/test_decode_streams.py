"""Decode per-layer parts against the paper's per-stream and per-layer measurements [paper §4].

These are intermediate measurements, not inputs: they localise the decode gap. The two-stream
view (:func:`stream_split`) is derived from core counts and operator measurements only, with the
paper's observation that a half-batch gate/dispatch/MoE is not cheaper than the unsplit one; it
lands on the paper's stated core split, while both of its streams fall short of the stated
~600 us per microbatch and its gains fall short of the ablation (see docs/simulator.md).
"""

import pytest

from matrixinfer.sim.decode import PAPER_ATTENTION_CORES, DecodeConfig, decode_step, stream_split
from matrixinfer.sim.paper import ascend_die
from matrixinfer.sim.shapes import deepseek_r1

SHAPES = deepseek_r1()
DIE = ascend_die()
# Batch 96 per NPU, 4K context, MTP on: the setting of the "about 600 us per stream" figure.
B96_CFG = DecodeConfig(batch_per_chip=96, context=4096 + 128)
B96 = decode_step(DIE, SHAPES, B96_CFG)
B96_NO_MTP = decode_step(DIE, SHAPES, DecodeConfig(batch_per_chip=96, context=4096 + 128, mtp=False))
B96_STREAMS = stream_split(DIE, SHAPES, B96_CFG, PAPER_ATTENTION_CORES)

# Each stream carries one microbatch (half the batch) per slot, two slots per layer:
# 2 x ~600 us + a short bubble = the measured 1,260 us per layer.
_SHORT = ("per microbatch, on the paper's 16 + 8 cores, the model's streams take ~496 us (attention) and "
          "~491 us (MoE) against the stated ~600 us each: both halves fall ~18% short, as does the "
          "layer; the paper gives per-operator times only as bar charts, so no measurement in the notes "
          "locates the difference")


@pytest.mark.xfail(strict=True, reason=_SHORT)
def test_attention_stream_matches_measured():
    assert B96_STREAMS.attention == pytest.approx(600e-6, rel=0.10)


@pytest.mark.xfail(strict=True, reason=_SHORT)
def test_moe_stream_matches_measured():
    assert B96_STREAMS.moe == pytest.approx(600e-6, rel=0.10)


def test_balanced_split_is_the_papers_core_allocation():
    # The paper states the split: attention on 16 AI cores (+32 vector), MoE on 8 (+16). Balancing
    # the model's streams, with half-batch MoE operators no cheaper than unsplit ones, lands on it.
    balanced = stream_split(DIE, SHAPES, B96_CFG)
    assert (balanced.attention_cores, balanced.moe_cores) == (16, 8)
    assert balanced.attention == pytest.approx(balanced.moe, rel=0.02)


def test_half_batch_moe_operators_are_not_cheaper_than_unsplit():
    # per microbatch the MoE stream takes at least the unsplit gate + dispatch + experts + combine
    whole = stream_split(DIE, SHAPES, B96_CFG, PAPER_ATTENTION_CORES)
    parts = decode_step(DIE, SHAPES, DecodeConfig(batch_per_chip=96, context=4096 + 128,
                                                  microbatch=False)).breakdown
    assert whole.moe >= parts["gate"] + parts["dispatch"] + parts["experts"] + parts["combine"] - 1e-9


_GAIN = ("with half-batch gate/dispatch/MoE no cheaper than unsplit ones, the derived gain is +1.8% "
         "(batch 64) and +3.3% (batch 96): the streams are ~18% short of the stated ~600 us, and the "
         "per-operator times that would locate it are only bar charts in the paper")


@pytest.mark.parametrize("batch, measured", [
    pytest.param(64, 0.058, marks=pytest.mark.xfail(strict=True, reason=_GAIN)),
    pytest.param(96, 0.094, marks=pytest.mark.xfail(strict=True, reason=_GAIN)),
    (128, 0.069)])
def test_pipeline_gain_matches_ablation(batch, measured):
    # Three points absolute: the paper's own three values spread 3.6 points.
    split = stream_split(DIE, SHAPES, DecodeConfig(batch_per_chip=batch, context=4096 + 128),
                         PAPER_ATTENTION_CORES)
    assert split.gain == pytest.approx(measured, abs=0.03)


def test_stream_view_lies_between_step_model_and_serial_layer():
    # The step applies the measured gain (+9.4%) to the serial layer; the stream view derives a
    # smaller one, so its layer sits between the two and the pipeline never loses to serial.
    assert B96.layer_time <= B96_STREAMS.layer <= B96_STREAMS.serial


def test_no_split_without_matrix_core_partition():
    from matrixinfer.sim.hardware import H800
    from matrixinfer.sim.measurements import NVIDIA_PROFILE
    from matrixinfer.sim.operators import Die
    assert stream_split(Die(H800, NVIDIA_PROFILE), SHAPES, B96_CFG) is None


@pytest.mark.xfail(strict=True, reason="per-layer 936/596 us vs measured 1,260/874 us: " + _SHORT)
def test_layer_latency_with_and_without_mtp():
    assert B96.layer_time == pytest.approx(1260e-6, rel=0.10)
    assert B96_NO_MTP.layer_time == pytest.approx(874e-6, rel=0.10)


def test_mtp_per_layer_increase_has_the_measured_size():
    # 874 -> 1,260 us: MTP's second query token per sequence adds ~386 us per layer.
    assert B96.layer_time - B96_NO_MTP.layer_time == pytest.approx(386e-6, rel=0.15)
