"""Multi-head Latent Attention (MLA) with the naive (prefill) and weight-absorbed (decode) paths.

The cache holds one latent per token: ``kv_lora_rank`` normalised compressed-KV values followed by
the ``qk_rope_head_dim`` rotated shared key. The naive path expands the latent to per-head K/V with
``kv_b_proj``; the absorbed path folds ``kv_b_proj`` into the query and the output instead, so
attention runs in the latent space and never materialises per-head keys.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.kernels import triton as triton_kernels
from matrixinfer.model.attention import AttentionGroup, AttentionMetadata, Int8PagedLatentCache, KVCache, block_slots
from matrixinfer.model.backend import CustomOp, cpu_float32
from matrixinfer.model.layers import Linear, RMSNorm, RotaryEmbedding, softmax_scale


class MLA(CustomOp):
    """MLA of DeepSeek-V2/V3; parameter names follow the Hugging Face checkpoints. The ``cpu``
    backend runs paged absorbed-form batches through the fused native kernels; the ``cuda``
    backend runs attention through the Triton kernels (:mod:`matrixinfer.kernels.triton`)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        bias = bool(cfg.raw.get("attention_bias", False))
        h = cfg.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = Linear(h, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, h, bias=bias)
        self.scale = softmax_scale(cfg)
        # Latent-space (absorbed) attention costs H x (D + R) per query-key pair, the naive one
        # H x (qk + v) plus expanding each key (H x (nope + v) x R): absorbed prefill pays off only
        # for few wide heads. Short queries against a longer context (a speculative verification's
        # K + 1 per sequence) are cheaper absorbed while q (D + R - qk - v) L <= (L - q) (nope + v) R;
        # with L >= 2q, that holds up to absorbed_max_query (85 for DeepSeek-V3).
        latent = self.kv_lora_rank + self.rope_dim
        self.absorbed_prefill = latent + self.kv_lora_rank <= 2 * (self.qk_dim + self.v_dim)
        extra = latent + self.kv_lora_rank - (self.qk_dim + self.v_dim)
        expand = (self.nope_dim + self.v_dim) * self.kv_lora_rank
        self.absorbed_max_query = max(1, expand // (2 * extra)) if extra > 0 else 1 << 30

    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split per head: ``W_UK [H, nope, R]`` and ``W_UV [H, v, R]``."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def supports(self, backend: str) -> bool:
        if backend == "cpu":  # the fused path reads these two weights itself; the projections are Linears
            return cpu_float32(self.kv_b_proj.weight, self.kv_a_layernorm.weight)
        if backend == "cuda":
            return triton_kernels.usable(self.kv_b_proj.weight)
        return super().supports(backend)

    def forward_native(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                       meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        """Attention over a flat batch ``x`` ``[T, hidden]``; returns ``[T, hidden]``."""
        q, kv = self._project(x)
        out = self._attend(q, kv, cos, sin, rope, meta, kv_cache)
        return self.o_proj(out.view(x.shape[0], self.n_heads * self.v_dim))

    def forward_cpu(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                    meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        """:meth:`forward_native`, with the fused native kernels wherever the batch allows them: over
        a paged float32 cache, in the absorbed form (:meth:`absorbed_for`)."""
        q, kv = self._project(x)
        slots = self._fused_slots(meta, kv_cache)
        if slots is None:
            out = self._attend(q, kv, cos, sin, rope, meta, kv_cache)
        else:
            out = self._fused(q, kv, cos, sin, rope, meta, slots)
        return self.o_proj(out.view(x.shape[0], self.n_heads * self.v_dim))

    def forward_cuda(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                     meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        """:meth:`forward_native` with attention in one Triton launch per layer: the absorbed form
        straight from a paged cache (:meth:`_triton_absorbed`) where :meth:`absorbed_for` allows,
        else the naive form over the whole flat batch (:meth:`_triton_naive`)."""
        q, kv = self._project(x)
        table = self._triton_table(meta, kv_cache)
        if table is not None and self.absorbed_for(meta):
            out = self._triton_absorbed(q, kv, cos, sin, rope, meta, kv_cache, table)
        elif meta.mode == "absorbed" or (self.absorbed_for(meta) and meta.paged):
            out = self._attend(q, kv, cos, sin, rope, meta, kv_cache)  # absorbed over an INT8 cache: PyTorch
        else:
            out = self._triton_naive(q, kv, cos, sin, rope, meta, kv_cache)
        return self.o_proj(out.reshape(x.shape[0], self.n_heads * self.v_dim))

    def _triton_table(self, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor | None:
        """This layer's slot table where the absorbed kernel can read it (a paged cache storing
        values, not INT8 rows), else None."""
        if kv_cache is None or meta.slot_mapping is None or not meta.paged \
                or isinstance(kv_cache, Int8PagedLatentCache):
            return None
        table = kv_cache.layer_slots(self.layer_idx)
        return table if table.is_floating_point() and table.stride(1) == 1 and triton_kernels.usable(table) else None

    def _latent(self, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        ckv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(ckv), rope.rotate(k_pe, cos, sin)], dim=-1)

    def _triton_absorbed(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         rope: RotaryEmbedding, meta: AttentionMetadata, kv_cache: KVCache | None,
                         table: torch.Tensor) -> torch.Tensor:
        from matrixinfer.kernels.triton.decode_attention import mla_decode  # imports triton: only once chosen
        from matrixinfer.kernels.triton.kv_prolog import mla_kv_prolog

        tables, tok_seq, tok_nkeys = meta.block_tables, meta.tok_seq, meta.tok_nkeys
        assert kv_cache is not None and meta.slot_mapping is not None and tables is not None and tok_seq is not None \
            and tok_nkeys is not None and meta.block_size is not None, "a paged batch's metadata"
        norm = self.kv_a_layernorm
        mla_kv_prolog(kv, norm.weight, norm.eps, cos, sin, rope.interleaved, meta.slot_mapping, table)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        w_uk, w_uv = self._kv_b()
        q_full = torch.cat([torch.einsum("thd,hdr->thr", q_nope, w_uk), rope.rotate(q_pe, cos, sin)], dim=-1)
        o_lat = mla_decode(q_full.to(table.dtype), table, tables, tok_seq, tok_nkeys, self.kv_lora_rank,
                           meta.block_size, self.scale, max(meta.context_lens))
        return torch.einsum("thr,hvr->thv", o_lat.to(q.dtype), w_uv)

    def _triton_naive(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      rope: RotaryEmbedding, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        """Keys of every sequence gathered into one flat tensor (the cached prefix and the new
        tokens), expanded with ``kv_b_proj`` in one matmul, then one causal varlen launch."""
        from matrixinfer.kernels.triton.prefill_attention import varlen_prefill

        latent = self._latent(kv, cos, sin, rope)
        if kv_cache is not None and meta.slot_mapping is not None:
            kv_cache.write(self.layer_idx, meta.slot_mapping, latent)
            assert meta.block_tables is not None and meta.block_size is not None, "a paged batch's metadata"
            # every sequence's positions 0 .. context_len - 1, built on the host: no device sync
            seq = torch.repeat_interleave(torch.arange(len(meta.context_lens)), torch.tensor(meta.context_lens))
            pos = torch.cat([torch.arange(c) for c in meta.context_lens])
            seq, pos = seq.to(latent.device, non_blocking=True), pos.to(latent.device, non_blocking=True)
            slots = block_slots(meta.block_tables[seq, pos // meta.block_size], pos, meta.block_size)
            ctx = kv_cache.gather(self.layer_idx, slots).to(q.dtype)
            k_lens = meta.context_lens
        else:
            ctx, k_lens = latent, meta.query_lens
        n = ctx.shape[0]
        k_nope, v = self.kv_b_proj(ctx[:, :self.kv_lora_rank]).view(n, self.n_heads, -1).split(
            [self.nope_dim, self.v_dim], dim=-1)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return varlen_prefill(q_nope, rope.rotate(q_pe, cos, sin), k_nope, ctx[:, self.kv_lora_rank:], v,
                              meta.query_lens, k_lens, self.scale)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[T, H, qk]`` and each token's compressed KV and rope key ``[T, rank + rope]``."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.n_heads, self.qk_dim), self.kv_a_proj_with_mqa(x)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        """The PyTorch attention: latents into the cache, then per group the naive or absorbed form."""
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = rope.rotate(q_pe, cos, sin)
        ckv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(ckv), rope.rotate(k_pe, cos, sin)], dim=-1)
        gather = partial(torch.index_select, latent, 0)  # keys are the batch's own tokens, or cache slots:
        if kv_cache is not None and meta.slot_mapping is not None:
            kv_cache.write(self.layer_idx, meta.slot_mapping, latent)
            gather = partial(kv_cache.gather, self.layer_idx)
        out = q.new_empty(q.shape[0], self.n_heads, self.v_dim)
        for group in meta.groups:
            absorbed = meta.mode == "absorbed" or (meta.mode == "auto" and group.decode)
            attend = self._absorbed if absorbed else self._naive
            s_, l_ = group.key_slots.shape
            ctx = gather(group.key_slots.reshape(-1)).view(s_, l_, -1).to(q.dtype)
            o = attend(q_nope[group.token_index], q_pe[group.token_index], ctx, group)
            if group.decode:  # one real query per sequence: no padding to drop
                out.index_copy_(0, group.token_index[:, 0], o[:, 0])
            else:
                out[group.token_index[group.valid]] = o[group.valid]
        return out

    def absorbed_for(self, meta: AttentionMetadata) -> bool:
        """Whether this batch may run entirely in the absorbed (latent-space) form, as the fused
        kernels do: always in ``absorbed`` mode, never in ``naive``, and in ``auto`` when absorbed
        prefill is the cheaper form for this model, or every sequence's query is short against its
        context (decodes, speculative verifications: see ``absorbed_max_query``)."""
        return self.absorbed_for_lens(meta.query_lens, meta.context_lens, meta.mode)

    def absorbed_for_lens(self, query_lens: list[int], context_lens: list[int], mode: str = "auto") -> bool:
        """:meth:`absorbed_for` of a batch with these query and context lengths in ``mode``."""
        if mode != "auto":
            return mode == "absorbed"
        if self.absorbed_prefill:
            return True
        longest = max(query_lens, default=1)
        if longest == 1:
            return True
        return longest <= self.absorbed_max_query and all(2 * q <= c for q, c in zip(query_lens, context_lens))

    def _fused_slots(self, meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor | None:
        """This layer's cache table where the fused kernels can run the batch (they read and write
        a paged float32 cache directly and compute the absorbed form), else None."""
        if kv_cache is None or meta.slot_mapping is None or not meta.paged or not self.absorbed_for(meta):
            return None
        slots = kv_cache.layer_slots(self.layer_idx)
        return slots if slots.dtype is torch.float32 and slots.is_cpu and slots.is_contiguous() else None

    def _fused(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rope: RotaryEmbedding, meta: AttentionMetadata, slots: torch.Tensor) -> torch.Tensor:
        """Fused prologs (latent into the cache, absorbed queries), attention and the W_UV epilogue."""
        slot_mapping, tables, tok_seq, tok_nkeys = meta.slot_mapping, meta.block_tables, meta.tok_seq, meta.tok_nkeys
        assert slot_mapping is not None and tables is not None and tok_seq is not None and tok_nkeys is not None \
            and meta.block_size is not None, "a paged batch's metadata"
        norm = self.kv_a_layernorm
        kernels.mla_kv_prolog(kv, norm.weight, norm.eps, cos, sin, slot_mapping, slots, rope.interleaved)
        w = self.kv_b_proj.weight
        q_full = kernels.mla_q_prolog(q, w, cos, sin, self.kv_lora_rank, self.v_dim, rope.interleaved)
        return kernels.paged_mla(q_full, slots, tables, tok_seq, tok_nkeys, self.kv_lora_rank, meta.block_size,
                                 self.scale, w_kv_b=w, nope=self.nope_dim, v_dim=self.v_dim)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor,
               group: AttentionGroup) -> torch.Tensor:
        """Expand latents to per-head K/V (MHA with ``qk_head_dim`` keys); inputs ``[S, Q, H, *]``, ``[S, L, D]``."""
        s, l_ = ctx.shape[:2]
        kv = self.kv_b_proj(ctx[..., :self.kv_lora_rank]).view(s, l_, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe = ctx[..., self.kv_lora_rank:][:, :, None, :].expand(-1, -1, self.n_heads, -1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=group.mask[:, None], scale=self.scale)
        return o.transpose(1, 2)  # [S, Q, H, v]

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor,
                  group: AttentionGroup) -> torch.Tensor:
        """Attend in the latent space: ``q_nope W_UK`` against latents, then ``W_UV`` on the output."""
        w_uk, w_uv = self._kv_b()
        q_lat = torch.einsum("sqhd,hdr->sqhr", q_nope, w_uk)
        q_full = torch.cat([q_lat, q_pe], dim=-1)  # [S, Q, H, R + rope]
        s, qn, h, d = q_full.shape
        scores = torch.bmm(q_full.reshape(s, qn * h, d), ctx.transpose(1, 2)).view(s, qn, h, -1)
        scores = scores.float() * self.scale
        scores = scores.masked_fill(~group.mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(ctx.dtype)
        o_lat = torch.bmm(probs.view(s, qn * h, -1), ctx[..., :self.kv_lora_rank]).view(s, qn, h, -1)
        return torch.einsum("sqhr,hvr->sqhv", o_lat, w_uv)
