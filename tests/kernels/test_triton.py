"""The Triton kernels of the CUDA backend, checked on CPU under Triton's interpreter against the
PyTorch paths (skipped where triton, the ``cuda`` extra, is not installed).

The interpreter runs every program of a grid in Python, so shapes are tiny; the module-level
test runs a three-layer checkpoint through ``MLA.forward_cuda`` (the code the CUDA backend runs)
against ``forward_native``.
"""

from __future__ import annotations

import pytest
import torch

# isort: off
from tests.kernels.triton_interpreter import interpret  # noqa: F401  (sets TRITON_INTERPRET=1 before triton loads)
# isort: on
from matrixinfer.kernels.triton.decode_attention import mla_decode
from matrixinfer.kernels.triton.kv_prolog import mla_kv_prolog
from matrixinfer.kernels.triton.norm import add_rmsnorm, rmsnorm
from matrixinfer.kernels.triton.prefill_attention import varlen_prefill
from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.backend import select_backend
from matrixinfer.model.layers import RMSNorm, RotaryEmbedding
from matrixinfer.model.loader import load_model


def _paged_reference(q, kv, tables, tok_seq, tok_nkeys, rank, bs, scale):
    out = []
    for t in range(q.shape[0]):
        n = int(tok_nkeys[t])
        pos = torch.arange(n)
        keys = kv[tables[int(tok_seq[t])][pos // bs].long() * bs + pos % bs]
        out.append((q[t] @ keys.T * scale).softmax(-1) @ keys[:, :rank])
    return torch.stack(out)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_decode_reads_the_block_table(num_splits):
    """Decodes and a 3-token verification in one launch, over shuffled blocks, with the keys in
    one range or split in three (the partial outputs combined by log-sum-exp; the third range of
    32 keys is empty)."""
    g = torch.Generator().manual_seed(0)
    heads, rank, rope, bs, nblocks = 3, 20, 8, 8, 24
    kv = torch.randn(nblocks * bs, rank + rope, generator=g)
    tables = torch.randperm(nblocks, generator=g)[:3 * 8].view(3, 8).int()
    tok_seq = torch.tensor([0, 1, 1, 1, 2], dtype=torch.int32)
    tok_nkeys = torch.tensor([64, 33, 34, 35, 1], dtype=torch.int32)
    q = torch.randn(5, heads, rank + rope, generator=g)
    got = mla_decode(q, kv, tables, tok_seq, tok_nkeys, rank, bs, 0.2, max_keys=64, num_splits=num_splits)
    want = _paged_reference(q, kv, tables, tok_seq, tok_nkeys, rank, bs, 0.2)
    assert (got - want).abs().max().item() < 1e-5


def test_mla_decode_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        mla_decode(torch.zeros(2, 2, 10), torch.zeros(8, 12), torch.zeros(1, 1, dtype=torch.int32),
                   torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 8, 8, 1.0, 1)


def test_varlen_prefill_is_causal_per_sequence():
    """Three sequences in one launch, two of them after a cached prefix (queries are the last
    tokens), against SDPA per sequence with the same offset causal mask."""
    g = torch.Generator().manual_seed(1)
    heads, nope, rope, vd = 2, 12, 8, 10
    q_lens, k_lens = [5, 1, 19], [5, 7, 23]
    qn = torch.randn(sum(q_lens), heads, nope, generator=g)
    qp = torch.randn(sum(q_lens), heads, rope, generator=g)
    kn = torch.randn(sum(k_lens), heads, nope, generator=g)
    kp = torch.randn(sum(k_lens), rope, generator=g)
    v = torch.randn(sum(k_lens), heads, vd, generator=g)
    got = varlen_prefill(qn, qp, kn, kp, v, q_lens, k_lens, 0.3)
    qs = ks = 0
    for ql, kl in zip(q_lens, k_lens):
        q = torch.cat([qn[qs:qs + ql], qp[qs:qs + ql]], -1).transpose(0, 1)
        k = torch.cat([kn[ks:ks + kl], kp[ks:ks + kl, None].expand(-1, heads, -1)], -1).transpose(0, 1)
        mask = torch.arange(kl)[None, :] <= torch.arange(kl - ql, kl)[:, None]
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v[ks:ks + kl].transpose(0, 1), attn_mask=mask,
                                                                scale=0.3).transpose(0, 1)
        assert (got[qs:qs + ql] - want).abs().max().item() < 1e-5
        qs, ks = qs + ql, ks + kl
    with pytest.raises(ValueError, match="q_len <= k_len"):
        varlen_prefill(qn[:3], qp[:3], kn[:2], kp[:2], v[:2], [3], [2], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_residual_match_the_module(dtype):
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
    x, res = (torch.randn(5, 48, generator=g).to(dtype) for _ in range(2))
    # float32 matches bit for bit; bfloat16 within two rounding steps (the interpreter emulates bf16 casts)
    tol = {} if dtype is torch.float32 else {"rtol": 2 ** -6, "atol": 2 ** -6}

    def same(a, b):
        if dtype is torch.float32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():
        same(rmsnorm(x, norm.weight, norm.eps), norm.forward_native(x))
        normed, total = add_rmsnorm(x, res, norm.weight, norm.eps)
        same(total, x + res)
        same(normed, norm.forward_native(x + res))


@pytest.mark.parametrize("interleaved", [True, False])
def test_kv_prolog_writes_the_latent_the_module_computes(interleaved):
    """Norm of the compressed KV, rotation of the rope key and the store at each token's slot, as
    ``MLA._latent`` followed by ``PagedLatentCache.write``; other slots untouched."""
    g = torch.Generator().manual_seed(5)
    rank, rope_dim, t = 24, 8, 5
    norm = RMSNorm(rank, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(rank, generator=g) + 0.5)
    rope = RotaryEmbedding.__new__(RotaryEmbedding)
    rope.interleaved = interleaved
    kv = torch.randn(t, rank + rope_dim, generator=g)
    angles = torch.rand(t, rope_dim // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([7, 2, 11, 0, 5])
    table = torch.full((12, rank + rope_dim), 9.0)
    mla_kv_prolog(kv, norm.weight, norm.eps, cos, sin, interleaved, slots, table)
    with torch.no_grad():
        want = torch.cat([norm.forward_native(kv[:, :rank]), rope.rotate(kv[:, rank:], cos, sin)], dim=-1)
    assert (table[slots] - want).abs().max().item() < 1e-6
    others = torch.ones(12, dtype=torch.bool)
    others[slots] = False
    assert bool((table[others] == 9.0).all())


def _steps(model, cache, tables):
    """Hidden states of a prefill step (naive form: the varlen kernel) and a step of a decode and a
    3-token chunk after a cached prefix (absorbed form: the paged kernel), on fixed tokens."""
    g = torch.Generator().manual_seed(3)
    outs = []
    for q_lens, ctx_lens, mode in (([6, 9], [6, 9], "naive"), ([1, 3], [7, 12], "auto")):
        ids = torch.randint(2, model.config.vocab_size, (sum(q_lens),), generator=g)
        pos = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)])
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, cache.block_size, mode=mode)
        with torch.no_grad():
            outs.append(model(ids, pos, meta, cache))
    return outs


def test_cuda_backend_matches_pytorch(tiny_v3):
    """``select_backend(model, "cuda")`` binds MLA, the blocks (add + norm) and the norms to the
    Triton kernels (runnable on CPU tensors under the interpreter): a prefill and a step of a
    decode and a chunk give the PyTorch path's hidden states and cache contents. About 8 s: the
    interpreter runs each of the ~60 attention programs in Python."""
    model = load_model(tiny_v3, progress=False)
    cfg = model.config
    tables = torch.tensor([[3, 0, 5, 7], [1, 6, 2, 4]])
    results = {}
    for backend in ("native", "cuda"):
        chosen = select_backend(model, backend)
        layers = cfg.num_hidden_layers if backend == "cuda" else 0
        assert chosen.get("MLA:cuda", 0) == chosen.get("Block:cuda", 0) == layers
        assert chosen.get("RMSNorm:cuda", 0) >= 4 * layers  # the block's two, MLA's q_a and kv_a norms
        cache = PagedLatentCache(model.num_cache_layers, 8, 4, cfg.kv_cache_dim)
        results[backend] = (_steps(model, cache, tables), cache)
    for got, want in zip(results["cuda"][0], results["native"][0]):
        assert (got - want).abs().max().item() < 1e-4
    assert (results["cuda"][1].data - results["native"][1].data).abs().max().item() < 1e-5
