"""The DeepSeek-V2/V3 transformer: blocks, the causal LM, and the multi-token-prediction module.

Module and parameter names follow the Hugging Face checkpoints (``model.layers.N.self_attn...``)
so that loading is a name lookup. The forward interface serves an engine: a flat batch of tokens,
explicit positions, per-batch :class:`AttentionMetadata`, and an optional :class:`KVCache`.
"""

from __future__ import annotations

import torch
from torch import nn

from matrixinfer.config import ModelConfig
from matrixinfer.model.attention import AttentionMetadata, KVCache
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
        for layer in self.model.layers:
            x = layer(x, cos, sin, self.rope, meta, kv_cache)
        return self.model.norm(x)

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
