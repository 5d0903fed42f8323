"""Tiny Hugging Face checkpoints written by transformers' own classes (the reference implementation)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
)


def tiny_config(arch: str = "v3", **overrides):
    """A transformers config for a tiny DeepSeek-V3 (``v3``) or V2 (``v2``) model."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    kw = dict(TINY)
    if arch == "v3":
        kw.update(q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
        kw.update(overrides)
        return DeepseekV3Config(**kw)
    kw.update(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
              routed_scaling_factor=1.0)
    kw.update(overrides)
    return DeepseekV2Config(**kw)


def make_checkpoint(path: Path, arch: str = "v3", seed: int = 0, **overrides) -> Path:
    """Write a random-weight tiny checkpoint with ``save_pretrained`` and return its directory."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = DeepseekV3ForCausalLM if arch == "v3" else DeepseekV2ForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the default init so that mistakes show in logits
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    model.save_pretrained(path)
    return Path(path)


def load_reference(path: Path):
    """transformers' own model from ``path`` in float32 eager mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
