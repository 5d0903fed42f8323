"""The runtime's operators as the profile names them, their work (FLOPs, bytes) and how a step
composes them (pure; the measuring is in :mod:`matrixinfer.sim.profiler`).

Operator names and axes (``tokens`` = rows of the flat batch, ``kv_len`` = keys each query sees):

| operator | axes | what runs |
|---|---|---|
| ``mla_prolog`` | tokens | q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa (``MLA._project``) |
| ``mla_core_q1`` | tokens, kv_len | latent prolog, absorbed attention over the paged cache, W_UV; 1 query a sequence |
| ``mla_core_qk`` | tokens, kv_len | the same with K + 1 = 2 queries per sequence (MTP verification) |
| ``mla_core_prefill`` | tokens | the same for one prompt chunk of that many tokens from position 0 |
| ``mla_epilogue`` | tokens | o_proj |
| ``dense_mlp`` | tokens | the first layers' dense MLP |
| ``shared_expert`` | tokens | the MoE layers' shared experts |
| ``routing`` | tokens | the gate (scores, group-limited top-k) |
| ``experts`` | tokens_per_expert | the routed experts' grouped GEMMs, every expert given that many tokens |
| ``rmsnorm`` | tokens | one RMSNorm |
| ``lm_head`` | tokens | the vocabulary projection of the sampled rows |
| ``sampling`` | tokens | the sampler over those rows (greedy) |
| ``layer_decode`` | tokens, kv_len | one MoE decoder layer as the CPU backend runs decode batches (one native call) |
| ``layer_decode_dense`` | tokens, kv_len | the same for a dense (first) layer |
| ``step_decode`` | tokens, kv_len | ``ModelRunner.execute``: metadata, forward, logits; one decode per sequence |
| ``step_prefill`` | tokens | ``ModelRunner.execute`` over one prompt chunk from position 0 |
| ``engine_host`` | tokens | engine step minus model runner and sampler (scheduler, blocks, detokenizer), decoding |
| ``ep_dispatch`` / ``ep_combine`` | ep, tokens | the expert-parallel backend's dispatch / combine over gloo ranks |
| ``ems_get`` / ``ems_put`` | block_kib, concurrency | seconds per block through the EMS client at that concurrency |
| ``api_request`` | tokens, load | a request's TTFT minus its engine time, beside ``load`` streaming requests |
| ``api_in`` | tokens, load | the part of ``api_request`` before the engine thread has the request |
| ``api_wake`` | idle_s | extra latency to a first token when the stack had no request for that long |
| ``api_token`` | streams | CPU seconds (server + bench client) per token streamed to that many clients |
| ``api_gap`` | streams | wall seconds per token delivered the engine thread spends between two steps |
| ``engine_cores`` | tokens | CPU seconds per second while the engine decodes that many sequences (cores busy) |
| ``serve_wait`` | streams | share of the served engine's step time its thread waited (a ratio) |
| ``serve_cpu`` | streams | the served engine's CPU per step over the same steps' without the API (a ratio) |
| ``serve_cpu_pd`` | idle_s | the same for a P/D decode worker's lone requests sent after that idle gap |
| ``idle_wake`` | tokens x idle_s | extra seconds of a step (1 token: a decode step) after the engine idled that long |
| ``kv_transfer`` | tokens | a prompt's KV from a prefill worker's sender to a decode worker's receiver, loopback |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from matrixinfer.config import ModelConfig

F32 = 4.0  # bytes per element: the CPU runtime computes in float32


@dataclass(frozen=True)
class Dims:
    """The model dimensions the operators' work depends on."""

    hidden: int
    heads: int
    q_lora: int
    nope: int
    rope: int
    v_dim: int
    rank: int
    inter: int
    moe_inter: int
    n_shared: int
    n_experts: int
    top_k: int
    vocab: int
    layers: int
    dense_layers: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> Dims:
        return cls(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, q_lora=cfg.q_lora_rank or 0,
                   nope=cfg.qk_nope_head_dim, rope=cfg.qk_rope_head_dim, v_dim=cfg.v_head_dim,
                   rank=cfg.kv_lora_rank, inter=cfg.intermediate_size, moe_inter=cfg.moe_intermediate_size or 0,
                   n_shared=cfg.n_shared_experts or 0, n_experts=cfg.n_routed_experts or 0,
                   top_k=cfg.num_experts_per_tok or 0, vocab=cfg.vocab_size, layers=cfg.num_hidden_layers,
                   dense_layers=sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)))

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def absorbed_prefill(self) -> bool:
        """Whether prompt chunks also run in the latent (absorbed) form (``MLA.absorbed_prefill``)."""
        qk = self.nope + self.rope
        return (self.rank + self.rope) + self.rank <= 2 * (qk + self.v_dim)


def _gemm(tokens: float, params: float, act_in: float, act_out: float) -> tuple[float, float]:
    return 2.0 * tokens * params, F32 * (params + tokens * (act_in + act_out))


def work(d: Dims, op: str, point: Sequence[float]) -> tuple[float, float]:
    """(FLOPs, bytes) of ``op`` at ``point``: the roofline the profile scales outside its grid."""
    t = point[0]
    h = d.hidden
    qk = d.nope + d.rope
    if op == "mla_prolog":
        q_params = h * d.q_lora + d.q_lora * d.heads * qk if d.q_lora else h * d.heads * qk
        return _gemm(t, q_params + h * (d.rank + d.rope), h, d.heads * qk + d.rank + d.rope)
    if op in ("mla_core_q1", "mla_core_qk"):
        keys = point[1]
        lat = d.rank + d.rope
        flops = t * d.heads * (2 * d.nope * d.rank + 2 * lat * keys + 2 * d.rank * keys + 2 * d.rank * d.v_dim)
        per_seq_keys = keys if op == "mla_core_q1" else keys / 2  # two queries share a sequence's keys
        return flops, F32 * (t * per_seq_keys * lat + d.heads * (d.nope + d.v_dim) * d.rank)
    if op == "mla_core_prefill":  # causal: token i sees i + 1 keys
        return work(d, "mla_core_q1", (t, (t + 1) / 2))[0], F32 * (t * (d.rank + d.rope)
                                                                 + d.heads * (d.nope + d.v_dim) * d.rank)
    if op == "mla_epilogue":
        return _gemm(t, d.heads * d.v_dim * h, d.heads * d.v_dim, h)
    if op == "dense_mlp":
        return _gemm(t, 3 * h * d.inter, h, h)
    if op == "shared_expert":
        return _gemm(t, 3 * h * d.moe_inter * d.n_shared, h, h)
    if op == "routing":
        return _gemm(t, d.n_experts * h, h, d.n_experts)
    if op == "experts":  # t tokens on every expert
        return _gemm(t * d.n_experts, 3 * h * d.moe_inter, h, h)[0], \
            F32 * (d.n_experts * 3 * h * d.moe_inter + 2 * t * d.n_experts * h)
    if op == "rmsnorm":
        return 4.0 * t * h, F32 * 2 * t * h
    if op == "lm_head":
        return _gemm(t, h * d.vocab, h, d.vocab)
    if op == "sampling":
        return 2.0 * t * d.vocab, F32 * t * d.vocab
    if op in ("layer_decode", "layer_decode_dense"):
        names = ["mla_prolog", "mla_core_q1", "mla_epilogue", "rmsnorm", "rmsnorm"]
        names += ["dense_mlp"] if op == "layer_decode_dense" else ["routing", "shared_expert"]
        parts = [work(d, name, point) for name in names]
        if op == "layer_decode":
            parts.append(work(d, "experts", (max(t * d.top_k / max(d.n_experts, 1), 1.0),)))
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    raise KeyError(f"no roofline for operator {op!r}")


@dataclass(frozen=True)
class StepShape:
    """One engine step: new tokens per sequence and the keys each sequence has after the step."""

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @property
    def mean_keys(self) -> float:
        """Mean keys a new token attends to (token i of a chunk sees all keys before it)."""
        total = sum(q * (c - q) + q * (q + 1) / 2 for q, c in zip(self.query_lens, self.context_lens))
        return total / max(self.tokens, 1)

