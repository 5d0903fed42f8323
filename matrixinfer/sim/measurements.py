"""Operator-level measurements: the only calibration the cost model uses besides specs.

Each value is a measured property of one operator (a kernel, a transfer, one pipeline
optimisation in isolation), never an end-to-end throughput. Sources: ``[paper §n]`` is
arXiv 2506.12708 as restated in ``docs/reference-design.md``; NVIDIA values come from the public
READMEs of the libraries DeepSeek published (FlashMLA, DeepGEMM, DeepEP) and the FlashAttention-3
paper. docs/simulator.md lists them again with the reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class A2APoint:
    """One measured dispatch or combine: EP degree, latency (s) and bandwidth (B/s) per rank."""

    ep: int
    latency_s: float
    bandwidth: float


@dataclass(frozen=True)
class OperatorProfile:
    """How close one platform's kernels get to its peaks.

    Attributes:
        gemm_util: achieved fraction of the INT8/FP8 peak for the model's large GEMMs.
        attn_compute_util: achieved fraction of the BF16 peak in compute-bound MLA attention.
        mem_bw_util: achieved fraction of HBM bandwidth in memory-bound kernels (weight or KV
            streaming).
        dispatch / combine: the decode (low-latency) all-to-all, measured at
            ``a2a_tokens`` tokens per rank, per EP degree.
        a2a_tokens: tokens per rank in those measurements.
        a2a_link_bw: per-rank link rate the per-token part of dispatch/combine streams at (the
            fabric's measured point-to-point write rate); the rest of the measured latency is
            treated as fixed (flags, barriers, launch).
        prefill_a2a_bw: per-rank bandwidth of the throughput-oriented (prefill) all-to-all.
        microbatch_gain_decode: measured throughput gain of the two-microbatch decode pipeline
            by batch per chip (an ablation of that one optimisation).
        microbatch_hidden_prefill: fraction of prefill communication hidden behind compute by
            the two-microbatch prefill pipeline.
    """

    name: str
    gemm_util: float
    attn_compute_util: float
    mem_bw_util: float
    dispatch: tuple[A2APoint, ...]
    combine: tuple[A2APoint, ...]
    a2a_tokens: int
    a2a_link_bw: float
    prefill_a2a_bw: float
    microbatch_gain_decode: tuple[tuple[int, float], ...]
    microbatch_hidden_prefill: float


US = 1e-6
GBS = 1e9
# The paper's dispatch/combine table is in GiB/s: read so, latency x bandwidth is ~9 messages per
# token of 7.5 KB (dispatch) and 14 KB (combine) at every EP degree [paper §4].
GIBS = float(2**30)

# [paper §4]: INT8 GEMM 77-83% of peak on the model's shapes (79.4%, 81.1% quoted) -> 0.80;
# MLA 65.4% compute / 84.1% bandwidth utilisation; FusedDispatch/FusedCombine table at 128 tokens
# per rank; UB NPU-NPU write 135 GB/s inter-node [paper §1]; microbatch decode gains
# +5.8/+9.4/+6.9% at batch 64/96/128 [paper §4].
# Prefill all-to-all: the same fused operators' measured EP32 rates (62 GB/s dispatch,
# 105 GB/s combine) - there is no separate prefill measurement in the paper.
# Prefill microbatch: +23..31% throughput [paper §5] with compute ~ communication implies the
# pipeline hides about half the communication; we take 0.5 (see docs/simulator.md).
ASCEND_PROFILE = OperatorProfile(
    name="Ascend 910C (CANN, paper operators)",
    gemm_util=0.80,
    attn_compute_util=0.654,
    mem_bw_util=0.841,
    dispatch=(A2APoint(8, 116 * US, 71 * GIBS), A2APoint(16, 131 * US, 63 * GIBS),
              A2APoint(32, 133 * US, 62 * GIBS), A2APoint(64, 141 * US, 58 * GIBS),
              A2APoint(128, 152 * US, 54 * GIBS), A2APoint(256, 152 * US, 54 * GIBS)),
    combine=(A2APoint(8, 118 * US, 131 * GIBS), A2APoint(16, 132 * US, 117 * GIBS),
             A2APoint(32, 146 * US, 105 * GIBS), A2APoint(64, 150 * US, 103 * GIBS),
             A2APoint(128, 150 * US, 103 * GIBS), A2APoint(256, 149 * US, 103 * GIBS)),
    a2a_tokens=128,
    a2a_link_bw=135 * GBS,
    prefill_a2a_bw=0.5 * (62 + 105) * GIBS,
    microbatch_gain_decode=((64, 0.058), (96, 0.094), (128, 0.069)),
    microbatch_hidden_prefill=0.5,
)

# NVIDIA Hopper (H800 measurements; applied to H100/H200 which share the SM array):
# - DeepGEMM README: FP8 GEMM "up to 1550 TFLOPS" on H800 -> 1550/1979 = 0.78.
# - FlashMLA README: 580 TFLOPS compute-bound (0.586 of 989) and 3000 GB/s memory-bound
#   (0.896 of 3.35 TB/s) on H800 SXM5.
# - DeepEP README, low-latency kernels, 128 tokens per rank, 7168 hidden, top-8, FP8 dispatch /
#   BF16 combine, H800 + CX7 400 Gb/s: dispatch 77/118/155/173/192/194 us, combine
#   114/195/273/314/369/360 us at EP 8/16/32/64/128/256; normal (prefill) kernels reach about
#   43-58 GB/s per GPU over RDMA -> 50 GB/s.
# - DeepSeek's inference-system overview (Feb 2025): two-microbatch overlap hides the
#   all-to-all in prefill and decode -> 0.9 hidden; decode gain taken as the full hidden share
#   (no separate ablation published), modelled by the same 0.9.
NVIDIA_PROFILE = OperatorProfile(
    name="NVIDIA Hopper (DeepGEMM, FlashMLA, DeepEP)",
    gemm_util=0.78,
    attn_compute_util=0.586,
    mem_bw_util=0.896,
    dispatch=(A2APoint(8, 77 * US, 98 * GBS), A2APoint(16, 118 * US, 63 * GBS),
              A2APoint(32, 155 * US, 48 * GBS), A2APoint(64, 173 * US, 43 * GBS),
              A2APoint(128, 192 * US, 39 * GBS), A2APoint(256, 194 * US, 39 * GBS)),
    combine=(A2APoint(8, 114 * US, 127 * GBS), A2APoint(16, 195 * US, 80 * GBS),
             A2APoint(32, 273 * US, 57 * GBS), A2APoint(64, 314 * US, 50 * GBS),
             A2APoint(128, 369 * US, 42 * GBS), A2APoint(256, 360 * US, 40 * GBS)),
    a2a_tokens=128,
    a2a_link_bw=50 * GBS,
    prefill_a2a_bw=50 * GBS,
    microbatch_gain_decode=(),
    microbatch_hidden_prefill=0.9,
)

# MTP: one draft token accepted ~70% of the time [paper §4].
MTP_ACCEPTANCE = 0.70


def profile_for(chip_name: str) -> OperatorProfile:
    """The operator profile of a chip in :mod:`matrixinfer.sim.hardware`."""
    return ASCEND_PROFILE if "Ascend" in chip_name else NVIDIA_PROFILE


def interpolate_a2a(points: tuple[A2APoint, ...], ep: int) -> A2APoint:
    """Measured point at ``ep``: linear in log2(EP) between measurements, clamped at the ends."""
    import math

    if ep <= points[0].ep:
        return points[0]
    if ep >= points[-1].ep:
        return points[-1]
    for lo, hi in zip(points, points[1:]):
        if lo.ep <= ep <= hi.ep:
            w = (math.log2(ep) - math.log2(lo.ep)) / (math.log2(hi.ep) - math.log2(lo.ep))
            return A2APoint(ep, lo.latency_s + w * (hi.latency_s - lo.latency_s),
                            lo.bandwidth + w * (hi.bandwidth - lo.bandwidth))
    raise AssertionError("unreachable")
