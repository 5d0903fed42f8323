"""Static-batch generation straight on the model runtime (no scheduler): prefill every prompt,
then decode all sequences together with a paged latent cache. The serving engine replaces this
for real traffic; it stays as the simplest correct driver of the runtime."""

from __future__ import annotations

import torch

from matrixinfer.model.attention import AttentionMetadata, make_cache
from matrixinfer.model.deepseek import DeepseekForCausalLM


@torch.inference_mode()
def generate(model: DeepseekForCausalLM, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, eos_token_ids: list[int] | None = None,
             seed: int | None = None, block_size: int = 16, kv_cache_dtype: str = "auto") -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (greedy when ``temperature`` is 0),
    with a paged cache of ``kv_cache_dtype`` (``auto``: the model's dtype; ``int8``)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    eos = set(eos_token_ids or [])
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    n = len(prompts)
    blocks_per_seq = -(-(max(len(p) for p in prompts) + max_new_tokens) // block_size)
    cache = make_cache(kv_cache_dtype, model.num_cache_layers, n * blocks_per_seq, block_size,
                       model.config.kv_cache_dim, model.config.kv_lora_rank, dtype, device)
    tables = torch.arange(n * blocks_per_seq, device=device).view(n, blocks_per_seq)
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.cat([torch.arange(k, device=device) for k in lens])
    meta = AttentionMetadata.build(lens, lens, tables, block_size, device)
    hidden = model(ids, pos, meta, cache)
    last = torch.tensor(lens, device=device).cumsum(0) - 1
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(n))
    logits = model.compute_logits(hidden[last])
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            nxt = logits.argmax(dim=-1)
        still = []
        for row, s in enumerate(active):
            tok = int(nxt[row])
            outputs[s].append(tok)
            if tok not in eos and len(outputs[s]) < max_new_tokens:
                still.append((s, tok))
        if not still:
            break
        active = [s for s, _ in still]
        ctx = [lens[s] + len(outputs[s]) for s in active]
        ids = torch.tensor([t for _, t in still], device=device)
        pos = torch.tensor([c - 1 for c in ctx], device=device)
        meta = AttentionMetadata.build([1] * len(active), ctx, tables[active], block_size, device)
        logits = model.compute_logits(model(ids, pos, meta, cache))
    return outputs
