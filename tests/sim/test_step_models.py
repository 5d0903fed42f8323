"""Decode and prefill step models: the directions a user would notice if they broke."""

import pytest

from matrixinfer.sim.decode import DecodeConfig, decode_step, routing_imbalance
from matrixinfer.sim.hardware import ASCEND_910C, CLOUDMATRIX384, H800, parse_hardware
from matrixinfer.sim.measurements import ASCEND_PROFILE, NVIDIA_PROFILE
from matrixinfer.sim.model_loading import model_loading_table
from matrixinfer.sim.operators import Die, dispatch_time
from matrixinfer.sim.prefill import PrefillConfig, prefill_step
from matrixinfer.sim.shapes import deepseek_r1

SHAPES = deepseek_r1()
ASC = Die(ASCEND_910C, ASCEND_PROFILE)


def test_shapes_come_from_config():
    assert SHAPES.layers == 61 and SHAPES.routed_experts == 256 and SHAPES.top_k == 8
    assert 660e9 < SHAPES.weight_bytes() < 700e9      # the paper's "671 GB INT8 model"


def test_decode_batch_trades_latency_for_throughput():
    rs = [decode_step(ASC, SHAPES, DecodeConfig(batch_per_chip=b)) for b in (8, 32, 96)]
    assert rs[0].tpot < rs[1].tpot < rs[2].tpot
    assert rs[0].tokens_per_s_per_chip < rs[1].tokens_per_s_per_chip < rs[2].tokens_per_s_per_chip


def test_mtp_helps_most_at_small_batch():
    gain = []
    for b in (8, 96):
        on = decode_step(ASC, SHAPES, DecodeConfig(batch_per_chip=b, mtp=True))
        off = decode_step(ASC, SHAPES, DecodeConfig(batch_per_chip=b, mtp=False))
        gain.append(on.tokens_per_s_per_chip / off.tokens_per_s_per_chip)
    assert gain[0] > gain[1] > 1.0


def test_imbalance_slows_decode_and_prefill():
    assert decode_step(ASC, SHAPES, DecodeConfig(imbalance=1.5)).tpot > \
        decode_step(ASC, SHAPES, DecodeConfig(imbalance=1.0)).tpot
    assert prefill_step(ASC, SHAPES, PrefillConfig(imbalance=1.3)).batch_time > \
        prefill_step(ASC, SHAPES, PrefillConfig(imbalance=1.0)).batch_time
    assert routing_imbalance(1000, 288) < routing_imbalance(100, 288)


def test_decode_memory_limit():
    assert decode_step(ASC, SHAPES, DecodeConfig(batch_per_chip=96)).fits
    assert not decode_step(ASC, SHAPES, DecodeConfig(batch_per_chip=1024)).fits


def test_context_cache_over_ub_beats_vpc():
    vpc_bw = CLOUDMATRIX384.vpc_bw_per_node / 16
    base = prefill_step(ASC, SHAPES, PrefillConfig())
    ub = prefill_step(ASC, SHAPES, PrefillConfig(reuse=0.9, pool_bw_per_die=CLOUDMATRIX384.cpu_pool_bw_per_die))
    vpc = prefill_step(ASC, SHAPES, PrefillConfig(reuse=0.9, pool_bw_per_die=vpc_bw))
    assert ub.batch_time < vpc.batch_time < base.batch_time


def test_dispatch_grows_with_tokens_and_ep():
    assert dispatch_time(ASC, 256, 128) > dispatch_time(ASC, 256, 16)
    assert dispatch_time(ASC, 256, 128) >= dispatch_time(ASC, 8, 128)
    nv = Die(H800, NVIDIA_PROFILE)
    assert dispatch_time(nv, 64, 128) == pytest.approx(173e-6, rel=1e-6)


def test_model_loading_pool_wins():
    rows = {r.name: r for r in model_loading_table(671e9)}
    assert rows["EMS pool"].cold_start_s < rows["local DRAM cache"].cold_start_s
    assert rows["EMS pool"].switch_s < rows["local DRAM cache"].switch_s < rows["no cache"].switch_s
    assert rows["EMS pool"].dram_copies == 1 and rows["local DRAM cache"].dram_copies == 8


def test_parse_hardware():
    assert parse_hardware("cm384").chips == 384
    assert parse_hardware("h800x8-nodes:4").chips == 32
    with pytest.raises(ValueError, match="h100x8-nodes:N"):
        parse_hardware("h100x8-nodes:many")
    with pytest.raises(ValueError, match="expected cm384"):
        parse_hardware("tpu")
