"""The fused CPU paged-MLA kernel against a direct PyTorch computation and against the model's
PyTorch attention path."""

import pytest
import torch

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.layers import RotaryEmbedding
from matrixinfer.model.mla import MLA
from tests.checkpoints import tiny_config

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the native kernel cannot be built")


def reference(q, cache, tables, q_lens, ctx_lens, rank, bs, scale):
    out, t = [], 0
    for s, (ql, cl) in enumerate(zip(q_lens, ctx_lens)):
        j = torch.arange(cl)
        keys = cache[tables[s, j // bs].long() * bs + j % bs]
        for i in range(ql):
            n = cl - ql + i + 1
            p = (q[t] @ keys[:n].T * scale).softmax(-1)
            out.append(p @ keys[:n, :rank])
            t += 1
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("heads,rank,rope,bs", [(4, 64, 16, 16), (16, 512, 64, 3), (1, 8, 4, 64)])
def test_kernel_matches_direct_attention(heads, rank, rope, bs):
    g = torch.Generator().manual_seed(heads)
    q_lens, ctx_lens = [1, 1, 5, 70, 1, 1], [1, 64, 65, 200, 129, 63]  # chunk (64) edges, prefix + chunk
    width = max((c + bs - 1) // bs for c in ctx_lens)
    nblocks = len(q_lens) * width + 3
    dim = rank + rope
    cache = torch.randn(nblocks * bs, dim, generator=g)
    tables = torch.randperm(nblocks, generator=g)[: len(q_lens) * width].view(len(q_lens), width).to(torch.int32)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, bs)
    out = kernels.paged_mla(q, cache, meta.block_tables, meta.tok_seq, meta.tok_nkeys, rank, bs, 0.07)
    ref = reference(q, cache, tables, q_lens, ctx_lens, rank, bs, 0.07)
    assert out.shape == (sum(q_lens), heads, rank)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_kernel_rejects_bad_inputs():
    q = torch.randn(2, 4, 80)
    cache = torch.randn(64, 80)
    tables = torch.zeros(2, 4, dtype=torch.int32)
    one = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be"):
        kernels.paged_mla(q.double(), cache, tables, one, one, 64, 16, 1.0)
    with pytest.raises(ValueError, match="block_tables must be"):
        kernels.paged_mla(q, cache, tables.long(), one, one, 64, 16, 1.0)
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.paged_mla(q, torch.randn(64, 81), tables, one, one, 64, 16, 1.0)
    x, ids, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    with pytest.raises(ValueError, match="topk_ids must be"):
        kernels.moe_experts(x, ids.int(), w, torch.randn(4, 6, 8), torch.randn(4, 8, 3))
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.moe_experts(x, ids, w, torch.randn(4, 6, 8), torch.randn(4, 8, 4))
    with pytest.raises(ValueError, match="unsupported routing"):
        kernels.v3_route(torch.randn(3, 10), torch.zeros(10), 3, 1, 2, True, 1.0)


@needs_kernel
@pytest.mark.parametrize("mode,interleave", [("auto", True), ("absorbed", True), ("absorbed", False)])
def test_mla_kernel_path_matches_pytorch_path(monkeypatch, mode, interleave):
    """One MLA layer over a paged cache (a chunked prefill, then a mixed prefill + decode step)
    gives the same output and cache contents with the kernels as with the PyTorch paths."""
    cfg = ModelConfig.from_dict(tiny_config(rope_interleave=interleave).to_dict())
    assert RotaryEmbedding(cfg).interleaved is interleave
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rope = RotaryEmbedding(cfg)
    bs = 4

    def run(use_kernel: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(kernels, "available", lambda: use_kernel)
        cache = PagedLatentCache(1, 32, bs, cfg.kv_cache_dim)
        tables = torch.tensor([[3, 7, 1, 9, 11, 13], [2, 4, 6, 8, 10, 12]])
        outs = []
        for q_lens, ctx_lens in (([9, 6], [9, 6]), ([1, 5], [10, 11]), ([1, 1], [11, 12])):
            torch.manual_seed(sum(ctx_lens))
            x = torch.randn(sum(q_lens), cfg.hidden_size)
            pos = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)])
            meta = AttentionMetadata.build(q_lens, ctx_lens, tables, bs, mode=mode)
            cos, sin = rope.cos_sin(pos)
            with torch.no_grad():
                outs.append(mla(x, cos, sin, rope, meta, cache))
        return outs + [cache.data]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("MATRIXINFER_KERNELS", "0")
    assert kernels.available() is False
    assert not kernels.usable(torch.zeros(2))


@needs_kernel
def test_rmsnorm_kernel_matches_pytorch(monkeypatch):
    from matrixinfer.model.layers import RMSNorm

    norm = RMSNorm(20, 1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 20) * 3
    with torch.no_grad():
        fast = norm(x)
        monkeypatch.setattr(kernels, "available", lambda: False)
        slow = norm(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_kernels_stay_out_of_autograd():
    """Training runs the PyTorch paths: the kernels have no backward."""
    from matrixinfer.model.layers import RMSNorm

    norm = RMSNorm(16)
    out = norm(torch.randn(4, 16, requires_grad=True))
    assert out.grad_fn is not None


@needs_kernel
@pytest.mark.parametrize("n_group,topk_group,norm", [(4, 2, True), (1, 1, False), (8, 3, True)])
def test_v3_routing_kernel_matches_pytorch(monkeypatch, n_group, topk_group, norm):
    from matrixinfer.model.moe import Gate

    cfg = ModelConfig.from_dict(tiny_config(n_routed_experts=32, n_group=n_group, topk_group=topk_group,
                                            num_experts_per_tok=4, norm_topk_prob=norm).to_dict())
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    torch.nn.init.normal_(gate.e_score_correction_bias, std=0.1)
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        fast = gate(x)
        monkeypatch.setattr(kernels, "available", lambda: False)
        slow = gate(x)
    assert torch.equal(fast.topk_ids.sort(-1).values, slow.topk_ids.sort(-1).values)
    order_f, order_s = fast.topk_ids.argsort(-1), slow.topk_ids.argsort(-1)
    torch.testing.assert_close(fast.topk_weights.gather(1, order_f), slow.topk_weights.gather(1, order_s))


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 256, 128), (5, 24, 7), (13, 20, 33), (48, 64, 4096)])
def test_linear_kernel_matches_torch(m, k, n):
    """Rows not a multiple of the 4-row tile, odd outputs, K not a multiple of the vector width."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    torch.testing.assert_close(kernels.linear(x, w), torch.nn.functional.linear(x, w), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_small_batch_linear_layer_uses_kernel_only_where_it_applies(monkeypatch):
    from matrixinfer.model.layers import Linear

    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    layer = Linear(16, 8, bias=False)
    with torch.no_grad():
        for rows in (3, Linear.small_rows, Linear.small_rows + 1):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(layer(x), x @ layer.weight.T, atol=1e-5, rtol=1e-5)
    assert calls == [3, Linear.small_rows]
    layer(torch.randn(2, 16)).sum().backward()  # with gradients on: PyTorch's path, which has a backward
    assert layer.weight.grad is not None and calls == [3, Linear.small_rows]


@needs_kernel
@pytest.mark.parametrize("arch_kw", [{}, {"n_group": 1, "topk_group": 1, "n_shared_experts": 0}])
def test_native_decoder_layers_match_the_per_operator_path(monkeypatch, arch_kw):
    """Whole layers in one native call == the per-operator path: hidden states and cache contents
    over a prefill chunk and decode steps (dense first layer, MoE layers with and without shared
    experts)."""
    from matrixinfer.model.deepseek import Block, DeepseekForCausalLM

    cfg = ModelConfig.from_dict(tiny_config(**arch_kw).to_dict())
    torch.manual_seed(3)
    model = DeepseekForCausalLM(cfg, with_mtp=False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    calls = []
    real = kernels.decoder_layer
    monkeypatch.setattr(kernels, "decoder_layer", lambda *a: calls.append(1) or real(*a))
    bs, tables = 4, torch.tensor([[3, 7, 1, 9, 11, 13], [2, 4, 6, 8, 10, 12]])

    def run(native: bool) -> list[torch.Tensor]:
        if not native:
            monkeypatch.setattr(Block, "native", lambda self, cache, interleaved: None)
        cache = PagedLatentCache(model.num_cache_layers, 16, bs, cfg.kv_cache_dim)
        torch.manual_seed(0)
        outs = []
        for q_lens, ctx_lens in (([9, 6], [9, 6]), ([1, 1], [10, 7]), ([1, 1], [11, 8])):
            ids = torch.randint(0, cfg.vocab_size, (sum(q_lens),))
            pos = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)])
            meta = AttentionMetadata.build(q_lens, ctx_lens, tables, bs, mode="absorbed")
            with torch.no_grad():
                outs.append(model(ids, pos, meta, cache))
        return outs + [cache.data.clone()]

    fast = run(True)
    assert len(calls) == 3 * cfg.num_hidden_layers
    for a, b in zip(fast, run(False)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_argmax_rows_matches_torch_including_ties_and_infinities():
    x = torch.randn(7, 300)
    x[1, [5, 17]] = 10.0  # a tie: the first index wins, as torch.argmax
    x[2] = float("-inf")
    x[3, 299] = float("inf")
    x[4] = 0.0
    assert kernels.argmax_rows(x).tolist() == x.argmax(-1).tolist()
