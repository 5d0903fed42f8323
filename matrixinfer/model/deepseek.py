"""The DeepSeek-V2/V3 transformer: blocks, the causal LM, and the multi-token-prediction module.

Module and parameter names follow the Hugging Face checkpoints (``model.layers.N.self_attn...``)
so that loading is a name lookup. The forward interface serves an engine: a flat batch of tokens,
explicit positions, per-batch :class:`AttentionMetadata`, and an optional :class:`KVCache`.
"""

from __future__ import annotations

import torch
from torch import nn

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.model.attention import AttentionMetadata, KVCache, PagedLatentCache
from matrixinfer.model.layers import MLP, Linear, RMSNorm, RotaryEmbedding
from matrixinfer.model.mla import MLA
from matrixinfer.model.moe import MoE


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense MLP or DeepSeekMoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                meta: AttentionMetadata, kv_cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rope, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _native_plan(self) -> list[tuple[dict, str]] | None:
        """Where the one-call native path finds each weight (a module's parameter or buffer dict
        and a name, read afresh on every call), or None where that path does not apply (no q
        LoRA, biases, V2 routing, ...)."""
        a, mlp = self.self_attn, self.mlp
        moe = isinstance(mlp, MoE)
        dense = mlp.shared_experts if moe else mlp
        if a.q_lora_rank is None or any(m.bias is not None for m in (a.q_a_proj, a.kv_a_proj_with_mqa, a.o_proj)):
            return None
        if moe and (mlp.gate.method != "noaux_tc" or mlp.gate.scoring != "sigmoid" or mlp.gate.n_experts > 1024):
            return None
        mods = [self.input_layernorm, a.q_a_proj, a.q_a_layernorm, a.q_b_proj, a.kv_a_proj_with_mqa,
                a.kv_a_layernorm, a.kv_b_proj, a.o_proj, self.post_attention_layernorm]
        mods += [dense.gate_proj, dense.up_proj, dense.down_proj] if dense is not None else []
        plan = [(m._parameters, "weight") for m in mods]
        if moe:
            plan += [(mlp.gate._parameters, "weight"), (mlp.gate._buffers, "e_score_correction_bias"),
                     (mlp.experts._parameters, "gate_up_proj"), (mlp.experts._parameters, "down_proj")]
        return plan

    def native(self, cache: PagedLatentCache, interleaved: bool) -> kernels.MiLayer | None:
        """This layer's description for the one-call native decode path (``kernels.decoder_layer``),
        or None where it does not apply. Rebuilt when a weight or the cache moves."""
        plan = self.__dict__.get("_native_src", False)
        if plan is False:
            plan = self.__dict__["_native_src"] = self._native_plan()
        if plan is None:
            return None
        tensors = [d[name] for d, name in plan]
        a = self.self_attn
        data = cache.data
        layer_ptr = data.data_ptr() + a.layer_idx * data.stride(0) * data.element_size()
        key = tuple(t.data_ptr() for t in tensors) + (layer_ptr, interleaved)
        if self.__dict__.get("_native_key") == key:
            return self.__dict__["_native"]
        layer_cache = cache.layer_slots(a.layer_idx)
        if any(t.dtype is not torch.float32 or not t.is_contiguous() for t in [*tensors, layer_cache]):
            return None
        mlp = self.mlp
        moe = isinstance(mlp, MoE)
        dense = mlp.shared_experts if moe else mlp
        ptr = [t.data_ptr() for t in tensors]
        spec = kernels.MiLayer(
            hidden=a.o_proj.weight.shape[0], heads=a.n_heads, q_lora=a.q_lora_rank, nope=a.nope_dim,
            rope=a.rope_dim, v_dim=a.v_dim, rank=a.kv_lora_rank, eps=self.input_layernorm.eps, scale=a.scale,
            interleaved=int(interleaved), in_norm=ptr[0], q_a=ptr[1], q_a_norm=ptr[2], q_b=ptr[3], kv_a=ptr[4],
            kv_a_norm=ptr[5], kv_b=ptr[6], o_proj=ptr[7], post_norm=ptr[8], cache=layer_cache.data_ptr())
        if dense is not None:
            spec.mlp_gate, spec.mlp_up, spec.mlp_down = ptr[9:12]
            spec.mlp_inter = dense.gate_proj.weight.shape[0]
        if moe:
            g = mlp.gate
            spec.router, spec.router_bias, spec.experts_gate_up, spec.experts_down = ptr[-4:]
            spec.n_experts, spec.n_group, spec.topk_group, spec.top_k = g.n_experts, g.n_group, g.topk_group, g.top_k
            spec.moe_inter, spec.norm_topk, spec.scaling = mlp.experts.inter, int(g.norm), g.scaling
        self.__dict__["_native"], self.__dict__["_native_key"] = spec, key
        return spec


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


class DeepseekForCausalLM(nn.Module):
    """DeepseekV3ForCausalLM / DeepseekV2ForCausalLM with an optional MTP module.

    ``forward`` returns the final-normed hidden states ``[T, hidden]``; ``compute_logits`` projects
    chosen rows to the vocabulary, so an engine only pays for the rows it samples.
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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Run the flat batch ``input_ids`` ``[T]`` at ``positions`` ``[T]``; returns hidden ``[T, H]``."""
        if input_ids.shape[0] != meta.num_tokens or positions.shape != input_ids.shape:
            raise ValueError(f"batch has {input_ids.shape[0]} tokens and {positions.shape[0]} positions, "
                             f"metadata describes {meta.num_tokens}")
        cos, sin = self.rope.cos_sin(positions)
        x = self.model.embed_tokens(input_ids)
        step = self._native_step(x, cos, sin, meta, kv_cache)
        for layer in self.model.layers:
            spec = layer.native(kv_cache, self.rope.interleaved) if step is not None else None
            if spec is not None:  # the whole layer in one native call, on x in place
                kernels.decoder_layer(spec, step, x)
            else:
                x = layer(x, cos, sin, self.rope, meta, kv_cache)
        return self.model.norm(x)

    def _native_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                     kv_cache: KVCache | None) -> kernels.MiStep | None:
        """The per-step inputs of the one-call native layers, or None where they do not apply: CPU
        float32 inference over a paged cache, at decode batch sizes (where a BLAS GEMM would win,
        and for naive attention, the per-operator path runs)."""
        if not isinstance(kv_cache, PagedLatentCache) or not meta.paged or x.shape[0] > Linear.small_rows \
                or not self.model.layers[0].self_attn.absorbed_for(meta) or not kernels.usable(x, kv_cache.data, cos):
            return None
        slots = meta.slot_mapping
        if int(slots.min()) < 0 or int(slots.max()) >= kv_cache.data.shape[1]:
            raise ValueError("slot mapping outside the KV cache")
        tables = meta.block_tables
        return kernels.MiStep(cos=cos.data_ptr(), sin=sin.data_ptr(), slots=slots.data_ptr(),
                              block_tables=tables.data_ptr(), tok_seq=meta.tok_seq.data_ptr(),
                              tok_nkeys=meta.tok_nkeys.data_ptr(), bt_stride=tables.shape[1],
                              block_size=meta.block_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def mtp_forward(self, next_ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor,
                    meta: AttentionMetadata, kv_cache: KVCache | None = None, depth: int = 0) -> torch.Tensor:
        """MTP depth ``depth``: row i combines ``prev_hidden[i]`` with the embedding of ``next_ids[i]``
        (the token after position ``positions[i]``); returns the depth's normed hidden states."""
        if depth >= len(self.mtp):
            raise ValueError(f"this model has {len(self.mtp)} MTP module(s); depth {depth} requested")
        m = self.mtp[depth]
        cos, sin = self.rope.cos_sin(positions)
        e = m.enorm(m.embed_tokens(next_ids))
        x = m.eh_proj(torch.cat([e, m.hnorm(prev_hidden)], dim=-1))
        x = m.block(x, cos, sin, self.rope, meta, kv_cache)
        return m.shared_head.norm(x)

    def mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return self.mtp[depth].shared_head.head(hidden).float()
