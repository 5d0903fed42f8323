"""Naive and weight-absorbed MLA agree, with and without a paged latent cache."""

from __future__ import annotations

import torch

from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.loader import load_model


def _run_chunked(model, seq: list[int], chunks: list[int], mode: str, block_size: int = 4) -> torch.Tensor:
    """Feed ``seq`` in chunks through a paged cache with a shuffled block table; return all logits."""
    cfg = model.config
    nblocks = -(-len(seq) // block_size)
    cache = PagedLatentCache(model.num_cache_layers, nblocks + 3, block_size, cfg.kv_cache_dim)
    table = torch.randperm(nblocks + 3, generator=torch.Generator().manual_seed(0))[:nblocks][None]
    out, done = [], 0
    for n in chunks:
        ids = torch.tensor(seq[done:done + n])
        pos = torch.arange(done, done + n)
        meta = AttentionMetadata.build([n], [done + n], table, block_size, mode=mode)
        out.append(model.compute_logits(model(ids, pos, meta, cache)))
        done += n
    return torch.cat(out)


def test_naive_and_absorbed_agree(tiny_v3):
    model = load_model(tiny_v3, progress=False)
    seq = torch.randint(2, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        meta = AttentionMetadata.build([23], mode="naive")
        full = model.compute_logits(model(torch.tensor(seq), torch.arange(23), meta))
        for mode in ("naive", "absorbed"):
            # 10-token prefill, a 5-token chunk, then single-token decode steps
            chunked = _run_chunked(model, seq, [10, 5] + [1] * 8, mode)
            assert (chunked - full).abs().max().item() < 1e-5, mode


def test_mixed_batch_of_prefills_and_decodes(tiny_v2):
    """One step holding decodes and prefill chunks gives each sequence its solo logits."""
    model = load_model(tiny_v2, progress=False)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (9, 14, 6)]
    bs = 4
    cache = PagedLatentCache(model.num_cache_layers, 16, bs, model.config.kv_cache_dim)
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    with torch.no_grad():
        # step 1: prefill all but the last token of seq 0 and 1; nothing of seq 2
        pre = [8, 13]
        ids = torch.tensor(seqs[0][:8] + seqs[1][:13])
        pos = torch.cat([torch.arange(8), torch.arange(13)])
        model(ids, pos, AttentionMetadata.build(pre, pre, tables[:2], bs), cache)
        # step 2: decode seq 0 and 1 (one token each) + full prefill of seq 2
        ids = torch.tensor([seqs[0][8], seqs[1][13]] + seqs[2])
        pos = torch.cat([torch.tensor([8, 13]), torch.arange(6)])
        meta = AttentionMetadata.build([1, 1, 6], [9, 14, 6], tables, bs)
        logits = model.compute_logits(model(ids, pos, meta, cache))
        for row, (s, p) in enumerate([(0, 8), (1, 13)]):
            solo = model.compute_logits(model(torch.tensor(seqs[s]), torch.arange(len(seqs[s])),
                                              AttentionMetadata.build([len(seqs[s])])))
            assert (logits[row] - solo[p]).abs().max().item() < 1e-5
        solo2 = model.compute_logits(model(torch.tensor(seqs[2]), torch.arange(6), AttentionMetadata.build([6])))
        assert (logits[2:] - solo2).abs().max().item() < 1e-5
