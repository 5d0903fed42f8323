"""The DeepSeek-V2/V3 transformer: blocks, the causal LM, and the multi-token-prediction module.

Module and parameter names follow the Hugging Face checkpoints (``model.layers.N.self_attn...``)
so that loading is a name lookup. The forward interface serves an engine: a flat batch of tokens,
explicit positions, per-batch :class:`AttentionMetadata`, and an optional :class:`KVCache`.
"""

from __future__ import annotations

from ctypes import Structure
from dataclasses import replace
from typing import cast

import torch
from torch import nn

from matrixinfer.config import ModelConfig
from matrixinfer.kernels import triton as triton_kernels
from matrixinfer.kernels.layer import DecoderLayer, LayerDims, ModelStep, native_step
from matrixinfer.model.attention import AttentionMetadata, KVCache, PagedLatentCache
from matrixinfer.model.backend import CustomOp, cpu_float32
from matrixinfer.model.layers import MLP, Linear, RMSNorm, RotaryEmbedding, rope_interleaved
from matrixinfer.model.mla import MLA
from matrixinfer.model.moe import MoE


class Block(CustomOp):
    """Pre-norm transformer block: MLA then a dense MLP or DeepSeekMoE.

    The ``cpu`` backend runs a decode step's layer in one native call (:mod:`matrixinfer.kernels.layer`)
    when the model hands it the step's shared inputs; other batches run the per-operator path,
    whose modules have their own backends. The ``cuda`` backend fuses the residual add into the
    MLP's norm (:mod:`matrixinfer.kernels.triton.norm`)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp: MoE | MLP = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.interleaved = rope_interleaved(cfg)
        self.native: DecoderLayer | None = None  # set while bound to the cpu backend

    def forward_native(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                       meta: AttentionMetadata, kv_cache: KVCache | None,
                       step: Structure | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rope, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cpu(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                    meta: AttentionMetadata, kv_cache: KVCache | None,
                    step: Structure | None = None) -> torch.Tensor:
        """With ``step`` (:func:`matrixinfer.kernels.layer.native_step`, which the model builds for
        decode-sized paged batches): the whole layer in one native call, on ``x`` in place."""
        if step is None or self.native is None or not isinstance(kv_cache, PagedLatentCache):
            return self.forward_native(x, cos, sin, rope, meta, kv_cache)
        self.native(step, x, kv_cache.data)
        return x

    def forward_cuda(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                     meta: AttentionMetadata, kv_cache: KVCache | None,
                     step: Structure | None = None) -> torch.Tensor:
        """:meth:`forward_native` with the residual add after attention fused into the MLP's norm
        (one Triton launch instead of an add and a norm over the hidden states)."""
        from matrixinfer.kernels.triton.norm import add_rmsnorm  # imports triton: only once chosen

        attn = self.self_attn(self.input_layernorm(x), cos, sin, rope, meta, kv_cache)
        post = self.post_attention_layernorm
        normed, x = add_rmsnorm(attn, x, post.weight, post.eps)
        return x + self.mlp(normed)

    def supports(self, backend: str) -> bool:
        if backend == "cpu":
            return self._describe() is not None
        if backend == "cuda":
            return triton_kernels.usable(self.post_attention_layernorm.weight)
        return super().supports(backend)

    def use_backend(self, backend: str) -> None:
        self.native = self._describe() if backend == "cpu" else None
        super().use_backend(backend)

    def _describe(self) -> DecoderLayer | None:
        """This layer as the one-call native path sees it, or None where that path does not apply
        (no q LoRA, biases, V2 routing, weights that are not float32 on the CPU, no kernels)."""
        a, mlp = self.self_attn, self.mlp
        moe, dense = (mlp, mlp.shared_experts) if isinstance(mlp, MoE) else (None, mlp)
        if a.q_lora_rank is None or any(m.bias is not None for m in (a.q_a_proj, a.kv_a_proj_with_mqa, a.o_proj)):
            return None
        if moe is not None and not moe.gate.supports("cpu"):  # the one-call path routes as the native V3 router does
            return None
        weights = {"in_norm": self.input_layernorm.weight, "q_a": a.q_a_proj.weight,
                   "q_a_norm": a.q_a_layernorm.weight, "q_b": a.q_b_proj.weight,
                   "kv_a": a.kv_a_proj_with_mqa.weight, "kv_a_norm": a.kv_a_layernorm.weight,
                   "kv_b": a.kv_b_proj.weight, "o_proj": a.o_proj.weight,
                   "post_norm": self.post_attention_layernorm.weight}
        dims = LayerDims(hidden=a.o_proj.weight.shape[0], heads=a.n_heads, q_lora=a.q_lora_rank, nope=a.nope_dim,
                         rope=a.rope_dim, v_dim=a.v_dim, rank=a.kv_lora_rank, eps=self.input_layernorm.eps,
                         scale=a.scale, interleaved=self.interleaved)
        if dense is not None:
            weights.update(mlp_gate=dense.gate_proj.weight, mlp_up=dense.up_proj.weight,
                           mlp_down=dense.down_proj.weight)
            dims = replace(dims, mlp_inter=dense.gate_proj.weight.shape[0])
        if moe is not None:
            g, ex = moe.gate, moe.experts
            weights.update(router=g.weight, router_bias=g.correction_bias(), experts_gate_up=ex.gate_up_proj,
                           experts_down=ex.down_proj)
            dims = replace(dims, n_experts=g.n_experts, n_group=g.n_group, topk_group=g.topk_group, top_k=g.top_k,
                           moe_inter=ex.inter, norm_topk=g.norm, scaling=g.scaling)
        if not cpu_float32(*weights.values()):
            return None
        return DecoderLayer(dims, weights, a.layer_idx)


class SharedHead(nn.Module):
    """The MTP module's output norm and vocabulary projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MTPLayer(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3, stored as ``model.layers.{num_hidden_layers + k}``).

    For position i it combines the previous depth's hidden state of token i with the embedding of
    token i+1: ``h' = Block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]))`` and predicts token i+2
    with ``shared_head``.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h, bias=False)
        self.block = Block(cfg, layer_idx)
        self.shared_head = SharedHead(cfg)


class DeepseekModel(nn.Module):
    """Embeddings, the main blocks and the final norm (``model.*`` in checkpoints)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(CustomOp):
    """DeepseekV3ForCausalLM / DeepseekV2ForCausalLM with an optional MTP module.

    ``forward`` returns the final-normed hidden states ``[T, hidden]``; ``compute_logits`` projects
    chosen rows to the vocabulary, so an engine only pays for the rows it samples. The ``cpu``
    backend runs decode-sized steps over a paged cache one native call per layer.
    """

    def __init__(self, cfg: ModelConfig, with_mtp: bool | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg)
        n_mtp = cfg.num_nextn_predict_layers if (with_mtp is None or with_mtp) else 0
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(n_mtp))

    @property
    def num_cache_layers(self) -> int:
        """Layers a KV cache must hold: the main blocks plus MTP blocks (which have their own)."""
        return self.config.num_hidden_layers + len(self.mtp)

    def forward_native(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_cache: KVCache | None = None) -> torch.Tensor:
        """Run the flat batch ``input_ids`` ``[T]`` at ``positions`` ``[T]``; returns hidden ``[T, H]``."""
        x, cos, sin = self._embed(input_ids, positions, meta)
        for layer in self.model.layers:
            x = layer(x, cos, sin, self.rope, meta, kv_cache)
        return self.model.norm(x)

    def forward_cpu(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    kv_cache: KVCache | None = None) -> torch.Tensor:
        """:meth:`forward_native`, handing the blocks the step's shared native inputs where the
        batch allows one call per layer."""
        x, cos, sin = self._embed(input_ids, positions, meta)
        step = self._native_step(x, cos, sin, meta, kv_cache)
        for layer in self.model.layers:
            x = layer(x, cos, sin, self.rope, meta, kv_cache, step)
        return self.model.norm(x)

    def supports(self, backend: str) -> bool:
        if backend == "cpu":
            return any(cast(Block, layer).supports("cpu") for layer in self.model.layers)
        return super().supports(backend)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if input_ids.shape[0] != meta.num_tokens or positions.shape != input_ids.shape:
            raise ValueError(f"batch has {input_ids.shape[0]} tokens and {positions.shape[0]} positions, "
                             f"metadata describes {meta.num_tokens}")
        cos, sin = self.rope.cos_sin(positions)
        return self.model.embed_tokens(input_ids), cos, sin

    def _native_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                     kv_cache: KVCache | None) -> Structure | None:
        """The per-step inputs of the one-call native layers, or None where they do not apply: a
        paged float32 cache, the absorbed form, decode batch sizes (where a BLAS GEMM would win,
        and for naive attention, the per-operator path runs)."""
        if not isinstance(kv_cache, PagedLatentCache) or not meta.paged or x.shape[0] > Linear.small_rows \
                or kv_cache.data.dtype is not torch.float32 or not kv_cache.data.is_cpu \
                or not cast(Block, self.model.layers[0]).self_attn.absorbed_for(meta):
            return None
        slots, tables, tok_seq, tok_nkeys = meta.slot_mapping, meta.block_tables, meta.tok_seq, meta.tok_nkeys
        assert slots is not None and tables is not None and tok_seq is not None and tok_nkeys is not None \
            and meta.block_size is not None, "a paged batch's metadata"
        return native_step(x, cos, sin, slots, tables, tok_seq, tok_nkeys, meta.block_size, kv_cache.data.shape[1])

    def native_model_step(self) -> ModelStep | None:
        """The whole decode-sized step in one native call (:class:`ModelStep`: embedding, layers,
        final norm, head), or None where that does not apply: a layer without its one-call path
        (the ``cpu`` backend not chosen for it), a norm or head not on the ``cpu`` backend, or
        weights that are not float32 on the CPU. Built on first use, again when a part changes."""
        layers = [cast(Block, layer) for layer in self.model.layers]
        natives = [layer.native for layer in layers]
        parts = (self.model.embed_tokens.weight, self.model.norm.weight, self.lm_head.weight)
        key = (*natives, *parts)
        cached = getattr(self, "_model_step", None)
        if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        step = None
        if all(n is not None for n in natives) and type(self.lm_head) is Linear and self.lm_head.bias is None \
                and self.lm_head.backend == "cpu" and self.model.norm.backend == "cpu" and cpu_float32(*parts):
            step = ModelStep([n for n in natives if n is not None], *parts[:2], self.model.norm.eps, parts[2])
        self.__dict__["_model_step"] = (key, step)  # (not a submodule or parameter: outside nn.Module's state)
        return step

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def mtp_forward(self, next_ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor,
                    meta: AttentionMetadata, kv_cache: KVCache | None = None, depth: int = 0) -> torch.Tensor:
        """MTP depth ``depth``: row i combines ``prev_hidden[i]`` with the embedding of ``next_ids[i]``
        (the token after position ``positions[i]``); returns the depth's normed hidden states."""
        if depth >= len(self.mtp):
            raise ValueError(f"this model has {len(self.mtp)} MTP module(s); depth {depth} requested")
        m = cast(MTPLayer, self.mtp[depth])
        cos, sin = self.rope.cos_sin(positions)
        e = m.enorm(m.embed_tokens(next_ids))
        x = m.eh_proj(torch.cat([e, m.hnorm(prev_hidden)], dim=-1))
        # the block bound to the cpu backend runs a draft step in one native call, as the main layers do
        step = self._native_step(x, cos, sin, meta, kv_cache) if m.block.native is not None else None
        x = m.block(x, cos, sin, self.rope, meta, kv_cache, step)
        return m.shared_head.norm(x)

    def share_mtp_weights(self) -> int:
        """Make each MTP module use the main model's embedding and output head where its own are
        equal to them (DeepSeek-V3 shares both; checkpoints store copies): one copy in memory and
        in the caches when drafts and verification alternate. Returns the tensors now shared."""
        shared = 0
        for layer in self.mtp:
            m = cast(MTPLayer, layer)
            for mine, main in ((m.embed_tokens, self.model.embed_tokens), (m.shared_head.head, self.lm_head)):
                w, v = mine.weight, main.weight
                if w is not v and w.shape == v.shape and w.dtype == v.dtype and w.device == v.device \
                        and torch.equal(w, v):
                    mine.weight = v
                    shared += 1
        return shared

    def mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return cast(MTPLayer, self.mtp[depth]).shared_head.head(hidden).float()
