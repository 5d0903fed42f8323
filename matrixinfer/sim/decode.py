"""Decode step model: DP attention + EP MoE on one instance, TPOT and tokens/s per chip.

One die is one rank. Attention and dense layers run data-parallel (each die its own sequences);
MoE layers run expert-parallel over all dies of the instance. With enough dies there is one
expert per die (the paper's EP320: dedicated shared-expert dies, routed dies, redundant copies of
hot experts); with fewer, each rank holds several routed experts and a local shared expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from matrixinfer.sim.measurements import MTP_ACCEPTANCE
from matrixinfer.sim.operators import (
    Die,
    attention_time,
    combine_time,
    dispatch_time,
    gemm_time,
)
from matrixinfer.sim.shapes import BF16, INT8, ModelShapes


@dataclass(frozen=True)
class DecodeConfig:
    """One decode instance and its load.

    Attributes:
        dies: ranks in the instance (DP degree = EP degree).
        batch_per_chip: running sequences per chip (package), split evenly over its dies.
        context: mean KV length per sequence (prompt + half the output).
        redundant_experts: extra copies of hot routed experts.
        shared_expert_dies: dies that hold only a shared-expert copy (0: shared expert local).
        imbalance: busiest expert rank's load over the mean (1.0 = perfect balance); None
            derives it from random routing fluctuation (:func:`routing_imbalance`).
        mtp: one MTP draft token per step; acceptance: its acceptance rate.
        microbatch: two-microbatch attention/MoE pipeline.
        kv_bytes: bytes per cached value (2 = BF16).
    """

    dies: int = 320
    batch_per_chip: float = 96
    context: float = 4096 + 128
    redundant_experts: int = 32
    shared_expert_dies: int = 32
    imbalance: float | None = None
    mtp: bool = True
    acceptance: float = MTP_ACCEPTANCE
    microbatch: bool = True
    kv_bytes: int = BF16


@dataclass(frozen=True)
class DecodeResult:
    """Outputs of :func:`decode_step` (times in seconds)."""

    step_time: float
    tpot: float
    tokens_per_s_per_chip: float
    layer_time: float
    breakdown: dict[str, float] = field(default_factory=dict)
    hbm_used_per_die: float = 0.0
    fits: bool = True


def routing_imbalance(tokens_per_expert: float, experts: int, skew: float = 1.0) -> float:
    """Expected busiest-expert load over the mean when routing is balanced on average.

    With EPLB the expected load of every physical expert is equal; the step-to-step counts are
    still random. Treating each expert's count as Poisson(lambda), the maximum of ``experts``
    of them is about ``lambda + sqrt(2 lambda ln experts)``. ``skew`` multiplies in any
    popularity skew EPLB leaves (1.0: none).
    """
    if tokens_per_expert <= 0 or experts <= 1:
        return skew
    return skew * (1.0 + math.sqrt(2.0 * math.log(experts) / tokens_per_expert))


def experts_per_rank(shapes: ModelShapes, cfg: DecodeConfig) -> int:
    """Routed (incl. redundant) experts each routed rank holds."""
    routed_ranks = cfg.dies - cfg.shared_expert_dies
    if routed_ranks <= 0:
        raise ValueError(f"decode: {cfg.dies} dies leave no rank for routed experts")
    return math.ceil((shapes.routed_experts + cfg.redundant_experts) / routed_ranks)


def _microbatch_gain(die: Die, batch_per_chip: float) -> float:
    """Throughput gain of the two-microbatch pipeline, interpolated over the measured batches."""
    pts = die.profile.microbatch_gain_decode
    if not pts or batch_per_chip < pts[0][0]:
        return 0.0
    if batch_per_chip >= pts[-1][0]:
        return pts[-1][1]
    for (b0, g0), (b1, g1) in zip(pts, pts[1:]):
        if b0 <= batch_per_chip <= b1:
            return g0 + (g1 - g0) * (batch_per_chip - b0) / (b1 - b0)
    return 0.0


@dataclass(frozen=True)
class _Paths:
    """One layer's two halves for ``q_tokens`` query tokens per die (seconds, bytes)."""

    attention: float          # MLA prolog, attention, o_proj
    moe: float                # gate, dispatch, experts on the busiest rank, combine
    attention_bytes: float    # HBM bytes the attention half reads (weights, KV)
    moe_bytes: float          # HBM bytes the MoE half reads (gate and expert weights)
    parts: dict[str, float]


def _paths(die: Die, shapes: ModelShapes, cfg: DecodeConfig, seqs: float, q_tokens: float,
           attention_share: float = 1.0, moe_share: float = 1.0) -> _Paths:
    """Attention half and MoE half of one layer on one die.

    ``attention_share`` / ``moe_share``: fraction of the die's matrix cores each half runs on
    (1.0: the whole die, as without microbatching).
    """
    total_tokens = q_tokens * cfg.dies
    epr = experts_per_rank(shapes, cfg)
    physical = shapes.routed_experts + cfg.redundant_experts
    imbalance = cfg.imbalance
    if imbalance is None:
        imbalance = routing_imbalance(total_tokens * shapes.top_k / physical, physical)

    # Attention half (per layer, per die).
    kv = seqs * cfg.context * shapes.kv_dim * cfg.kv_bytes
    proj = gemm_time(die, q_tokens, shapes.attn_proj_params, INT8, attention_share)
    absorb = gemm_time(die, q_tokens, shapes.attn_absorb_params, BF16, attention_share)
    attn = attention_time(die, q_tokens * shapes.attn_decode_flops(cfg.context), kv,
                          attention_share)
    attention_bytes = shapes.attn_proj_params * INT8 + shapes.attn_absorb_params * BF16 + kv

    # MoE half: gate, dispatch, experts on the busiest rank, combine.
    gate_params = shapes.hidden * shapes.routed_experts
    gate = gemm_time(die, q_tokens, gate_params, BF16, moe_share)
    routed_load = total_tokens * shapes.top_k / physical * imbalance
    routed = epr * gemm_time(die, routed_load, shapes.expert_params, INT8, moe_share)
    shared_params = shapes.shared_experts * shapes.expert_params
    if cfg.shared_expert_dies:
        shared = gemm_time(die, total_tokens / cfg.shared_expert_dies, shared_params, INT8,
                           moe_share)
        experts = max(routed, shared)
        expert_bytes = max(epr * shapes.expert_params, shared_params) * INT8
    else:
        experts = routed + gemm_time(die, q_tokens, shared_params, INT8, moe_share)
        expert_bytes = (epr * shapes.expert_params + shared_params) * INT8
    disp = dispatch_time(die, cfg.dies, q_tokens, imbalance)
    comb = combine_time(die, cfg.dies, q_tokens, imbalance)
    parts = {"attn_proj": proj + absorb, "attn_core": attn, "gate": gate, "dispatch": disp,
             "experts": experts, "combine": comb, "imbalance": imbalance}
    return _Paths(proj + absorb + attn, gate + disp + experts + comb, attention_bytes,
                  gate_params * BF16 + expert_bytes, parts)


@dataclass(frozen=True)
class StreamSplit:
    """One MoE layer as the two-microbatch decode pipeline runs it [paper §4].

    The batch is cut into two microbatches. One stream runs the attention half (MLA prolog,
    attention, o_proj) of one microbatch while the other runs the MoE half (gate, dispatch,
    experts, combine) of the other; each stream is pinned to its own share of the die's matrix
    cores, so a layer takes two slots of ``max(attention, moe)``. Both streams read HBM at once,
    so a slot also lasts at least their combined bytes at the die's bandwidth. The cores are
    split to minimise the slot (the paper balances the streams the same way); every
    microbatch pays its own weight reads and its own fixed dispatch/combine cost.

    Attributes (seconds):
        attention_cores / moe_cores: matrix cores each stream runs on.
        attention / moe: one microbatch through each stream.
        hbm: both streams' HBM reads for one slot.
        layer: both microbatches through the layer, ``2 x max(attention, moe, hbm)``.
        serial: the same layer without microbatching, both halves in turn on the whole die.
    """

    attention_cores: int
    moe_cores: int
    attention: float
    moe: float
    hbm: float
    layer: float
    serial: float

    @property
    def gain(self) -> float:
        """Throughput gain of the pipeline over running the layer without microbatching."""
        return self.serial / self.layer - 1.0


# [paper §4.2.3] stream 0 (MLA prolog, attention, o_proj) runs on 16 of the die's 24 AI cores
# (+32 vector cores), stream 1 (gate, dispatch, MLP, combine) on 8 (+16).
PAPER_ATTENTION_CORES = 16
# [paper §4.2.3] single-microbatch gating, dispatch and MoE are marginally slower than unsplit
# ones: a half-batch operator on the stream's cores is never cheaper than the full batch on the die.
MOE_STREAM_OPS = ("gate", "dispatch", "experts", "combine")


def stream_split(die: Die, shapes: ModelShapes, cfg: DecodeConfig,
                 attention_cores: int | None = None) -> StreamSplit | None:
    """The two-stream pipeline of one MoE layer for ``cfg``.

    ``attention_cores``: the attention stream's matrix cores (the paper's 16 is
    :data:`PAPER_ATTENTION_CORES`); None picks the split that balances the streams. The MoE
    stream's operators take at least their unsplit time (the paper's observation). Derived from
    core counts, operator measurements and the step's shapes only; the decode step itself applies
    the measured pipeline gain (:func:`decode_step`), and this view checks that gain and the
    paper's per-stream times. None where the chip's matrix cores are not split between streams.
    """
    cores = die.chip.matrix_cores_per_die
    if cores < 2:
        return None
    seqs = cfg.batch_per_chip / die.chip.dies
    q_tokens = seqs * (2 if cfg.mtp else 1)
    whole = _paths(die, shapes, cfg, seqs, q_tokens)
    best: StreamSplit | None = None
    for a_cores in (range(1, cores) if attention_cores is None else (attention_cores,)):
        share = a_cores / cores
        half = _paths(die, shapes, cfg, seqs / 2, q_tokens / 2, share, 1.0 - share)
        moe = half.moe + sum(max(whole.parts[k] - half.parts[k], 0.0) for k in MOE_STREAM_OPS)
        hbm = (half.attention_bytes + half.moe_bytes) / die.stream_bw
        layer = 2.0 * max(half.attention, moe, hbm)
        if best is None or layer < best.layer:
            best = StreamSplit(a_cores, cores - a_cores, half.attention, moe, hbm, layer,
                               whole.attention + whole.moe)
    return best


@dataclass(frozen=True)
class _Layer:
    """One MoE layer of a decode step on one die (seconds) and its parts."""

    time: float
    dense_time: float
    parts: dict[str, float]


def _layer(die: Die, shapes: ModelShapes, cfg: DecodeConfig, seqs: float, q_tokens: float,
           gain: float) -> _Layer:
    """Attention path + MoE path of one layer for ``q_tokens`` query tokens per die.

    The MTP module is such a layer over one token per sequence: it pays the same weight reads
    and the same fixed dispatch/combine cost as a main layer, so it is timed with its own token
    count instead of as a fraction of a main layer.
    """
    paths = _paths(die, shapes, cfg, seqs, q_tokens)
    attn_path, moe_path = paths.attention, paths.moe
    disp, comb = paths.parts["dispatch"], paths.parts["combine"]
    if cfg.microbatch and not die.profile.microbatch_gain_decode:
        # No ablation published: hide the stated share of communication behind compute.
        hidden = min(die.profile.microbatch_hidden_prefill * (disp + comb),
                     attn_path + paths.parts["experts"])
        moe_layer = attn_path + moe_path - hidden
    else:
        moe_layer = (attn_path + moe_path) / (1.0 + gain)
    dense_layer = (attn_path + gemm_time(die, q_tokens, shapes.dense_mlp_params, INT8)) / (1.0 + gain)
    return _Layer(moe_layer, dense_layer, paths.parts)


def decode_step(die: Die, shapes: ModelShapes, cfg: DecodeConfig) -> DecodeResult:
    """Time one decode step of the whole instance (every die runs the same schedule)."""
    chip = die.chip
    seqs = cfg.batch_per_chip / chip.dies                   # sequences per die
    q_tokens = seqs * (2 if cfg.mtp else 1)                # query tokens per die per step
    epr = experts_per_rank(shapes, cfg)
    gain = _microbatch_gain(die, cfg.batch_per_chip) if cfg.microbatch else 0.0
    main = _layer(die, shapes, cfg, seqs, q_tokens, gain)
    moe_layer = main.time

    # MTP module: its input projection (concatenated embedding and hidden state, 2h -> h) and
    # one MoE block over one token per sequence, plus its own head pass.
    mtp_layers = shapes.mtp_layers if cfg.mtp else 0
    mtp_time = 0.0
    if mtp_layers:
        mtp_block = _layer(die, shapes, cfg, seqs, seqs, gain).time
        mtp_proj = gemm_time(die, seqs, 2 * shapes.hidden * shapes.hidden, INT8)
        mtp_time = mtp_layers * (mtp_block + mtp_proj)
    head = gemm_time(die, q_tokens, shapes.head_params, BF16)
    head_mtp = gemm_time(die, seqs, shapes.head_params, BF16) if cfg.mtp else 0.0
    step = (shapes.moe_layers * moe_layer + shapes.dense_layers * main.dense_time
            + mtp_time + head + head_mtp)
    tokens_per_step = 1.0 + (cfg.acceptance if cfg.mtp else 0.0)
    tpot = step / tokens_per_step

    # HBM footprint per die: replicated attention/dense/head weights, local experts, KV cache.
    weights = shapes.weight_bytes(INT8, experts=max(epr, 1))
    used = weights + seqs * cfg.context * shapes.kv_bytes_per_token(cfg.kv_bytes)
    breakdown = {**main.parts, "microbatch_gain": gain, "head": head + head_mtp, "mtp": mtp_time}
    return DecodeResult(
        step_time=step,
        tpot=tpot,
        tokens_per_s_per_chip=cfg.batch_per_chip / tpot,
        layer_time=moe_layer,
        breakdown=breakdown,
        hbm_used_per_die=used,
        fits=used <= die.hbm_bytes,
    )
