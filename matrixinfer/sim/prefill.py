"""Prefill step model: SP-TP-SP MLA, EP MoE, microbatch overlap and context-cache hits.

A prefill instance of ``dies`` ranks processes a batch of prompts; each die holds
``tokens_per_chip / dies_per_chip`` prompt tokens. MLA runs sequence-parallel for the
down-projections, all-gathers the latents across a tensor-parallel group, runs the
up-projections and attention head-parallel (non-absorbed, as multi-head attention), and returns to
sequence-parallel with an all-to-all before o_proj. MoE is expert-parallel over all dies.
With context caching, the cached prefix of each prompt is loaded from the memory pool instead of
computed; its latents still go through the K/V up-projection for attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from matrixinfer.sim.operators import (
    Die,
    a2a_bulk_time,
    attention_time,
    combine_bytes_per_token,
    dispatch_bytes_per_token,
    gemm_time,
    transfer_time,
)
from matrixinfer.sim.shapes import BF16, INT8, ModelShapes


@dataclass(frozen=True)
class PrefillConfig:
    """One prefill instance and its batch.

    Attributes:
        dies: ranks in the instance (= EP degree).
        tp: tensor-parallel group (dies) for MLA up-projections and attention.
        tokens_per_chip: prompt tokens per chip in one batch (cached ones included).
        prompt_len: tokens per prompt.
        reuse: fraction of each prompt found in the context cache (0..1).
        pool_bw_per_die: bandwidth a die loads cached KV at (B/s); 0 with reuse = 0.
        imbalance: busiest expert rank's load over the mean (1.0 = perfect balance).
        redundant_experts: extra expert copies (spread over the dies).
        microbatch: two-microbatch compute/communication overlap.
        kv_bytes: bytes per cached value (2 = BF16).
        dies_per_node: dies joined by a fast intra-node fabric (NVLink: 8 GPUs), or 0 where every
            die reaches every other over one fabric (the supernode's UB). With nodes, a token's
            dispatch/combine crosses the network once per remote node and fans out inside the
            node over NVLink (DeepEP's normal kernels), so only those bytes count.
    """

    dies: int = 32
    tp: int = 32
    tokens_per_chip: float = 16384
    prompt_len: float = 4096
    reuse: float = 0.0
    pool_bw_per_die: float = 0.0
    imbalance: float = 1.0
    redundant_experts: int = 32
    microbatch: bool = True
    kv_bytes: int = BF16
    dies_per_node: int = 0


@dataclass(frozen=True)
class PrefillResult:
    """Outputs of :func:`prefill_step` (seconds)."""

    batch_time: float
    tokens_per_s_per_chip: float
    layer_time: float
    breakdown: dict[str, float] = field(default_factory=dict)
    hbm_used_per_die: float = 0.0
    fits: bool = True


def _distinct_remote_dies(top_k: int, experts_per_die: float, dies: int) -> float:
    """Expected distinct remote dies a token's top-k experts land on (one copy sent per die)."""
    if dies <= 1:
        return 0.0
    per_die = max(experts_per_die, 1.0)
    picks = min(top_k, dies * per_die)
    # Each of the top-k experts lands on a uniformly random die.
    distinct = dies * (1.0 - (1.0 - 1.0 / dies) ** picks)
    return distinct * (dies - 1) / dies


def _distinct_remote_nodes(top_k: int, experts_per_die: float, dies: int, dies_per_node: int) -> float:
    """Expected distinct remote nodes a token's top-k experts land on (one network copy per node)."""
    nodes = max(dies // max(dies_per_node, 1), 1)
    if nodes <= 1:
        return 0.0
    picks = min(top_k, dies * max(experts_per_die, 1.0))
    return nodes * (1.0 - (1.0 - 1.0 / nodes) ** picks) * (nodes - 1) / nodes


def prefill_step(die: Die, shapes: ModelShapes, cfg: PrefillConfig) -> PrefillResult:
    """Time one prefill batch on the instance; every die runs the same schedule."""
    if not 0.0 <= cfg.reuse < 1.0:
        raise ValueError(f"prefill: reuse must be in [0, 1), got {cfg.reuse}")
    chip = die.chip
    tokens = cfg.tokens_per_chip / chip.dies            # prompt tokens per die
    prompts = tokens / cfg.prompt_len
    computed = tokens * (1.0 - cfg.reuse)
    cached_len = cfg.prompt_len * cfg.reuse

    # MLA: projections on computed tokens, K/V up-projection over the whole context, causal
    # attention of the suffix over prefix + itself.
    proj = gemm_time(die, computed, shapes.attn_proj_params, INT8)
    kv_up = gemm_time(die, tokens, shapes.attn_absorb_params, BF16)
    pairs = prompts * (cfg.prompt_len ** 2 - cached_len ** 2) / 2.0
    attn = attention_time(die, shapes.attn_prefill_flops(1.0) * pairs, 0.0)
    tp = max(cfg.tp, 1)
    latent = (shapes.q_lora + shapes.kv_dim) * BF16
    gather = computed * latent * (tp - 1) + tokens * cfg.reuse * shapes.kv_dim * BF16 * (tp - 1)
    to_sp = computed * shapes.heads * shapes.v_dim * BF16 * (tp - 1) / tp
    tp_comm = a2a_bulk_time(die, gather + to_sp) if tp > 1 else 0.0

    # MoE: experts on the busiest rank, dispatch/combine of the computed tokens.
    physical = shapes.routed_experts + cfg.redundant_experts
    per_die = physical / cfg.dies
    experts = (gemm_time(die, computed * shapes.top_k * cfg.imbalance, shapes.expert_params, INT8)
               + gemm_time(die, computed, shapes.shared_experts * shapes.expert_params, INT8))
    if cfg.dies_per_node:  # network bytes once per remote node; NVLink fan-out inside it
        dest = _distinct_remote_nodes(shapes.top_k, per_die, cfg.dies, cfg.dies_per_node)
    else:
        dest = _distinct_remote_dies(shapes.top_k, per_die, cfg.dies)
    a2a_bytes = computed * (dispatch_bytes_per_token(shapes.hidden, dest)
                            + combine_bytes_per_token(shapes.hidden, dest))
    moe_comm = a2a_bulk_time(die, a2a_bytes) * cfg.imbalance
    dense = gemm_time(die, computed, shapes.dense_mlp_params, INT8)

    hidden = die.profile.microbatch_hidden_prefill if cfg.microbatch else 0.0

    def overlapped(compute: float, comm: float) -> float:
        return compute + comm - min(hidden * comm, compute)

    moe_layer = overlapped(proj + kv_up + attn + experts, tp_comm + moe_comm)
    dense_layer = overlapped(proj + kv_up + attn + dense, tp_comm)
    layers_time = ((shapes.moe_layers + shapes.mtp_layers) * moe_layer
                   + shapes.dense_layers * dense_layer)
    # Cached KV: every layer's latent for the cached prefix, loaded once per batch from the pool
    # (overlapped with nothing: it must land before the first layer that needs it).
    cache_bytes = tokens * cfg.reuse * shapes.kv_bytes_per_token(cfg.kv_bytes)
    load = transfer_time(cache_bytes, cfg.pool_bw_per_die) if cache_bytes > 0 else 0.0
    batch = layers_time + load
    breakdown = {
        "attn_proj": proj + kv_up, "attn_core": attn, "tp_comm": tp_comm, "experts": experts,
        "moe_comm": moe_comm, "dense_mlp": dense, "cache_load": load,
    }
    # HBM per die: replicated attention/dense/head weights, this rank's experts, the batch's KV.
    weights = shapes.weight_bytes(INT8, experts=per_die + shapes.shared_experts)
    used = weights + tokens * shapes.kv_bytes_per_token(cfg.kv_bytes)
    return PrefillResult(
        batch_time=batch,
        tokens_per_s_per_chip=cfg.tokens_per_chip / batch,
        layer_time=moe_layer,
        breakdown=breakdown,
        hbm_used_per_die=used,
        fits=used <= die.hbm_bytes,
    )
