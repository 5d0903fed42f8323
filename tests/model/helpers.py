"""What model tests share: a prefill and decode steps over a paged cache."""

from __future__ import annotations

import torch

from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.deepseek import DeepseekForCausalLM


def run_paged_steps(model: DeepseekForCausalLM, cache: PagedLatentCache, tables: torch.Tensor,
                    steps: list[tuple[list[int], list[int]]], mode: str = "auto") -> list[torch.Tensor]:
    """Hidden states of each step ``(query_lens, context_lens)`` on random token ids (seed 0),
    the steps' KV written into ``cache`` through ``tables``."""
    torch.manual_seed(0)
    outs = []
    for q_lens, ctx_lens in steps:
        ids = torch.randint(0, model.config.vocab_size, (sum(q_lens),))
        pos = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)])
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, cache.block_size, mode=mode)
        with torch.no_grad():
            outs.append(model(ids, pos, meta, cache))
    return outs
