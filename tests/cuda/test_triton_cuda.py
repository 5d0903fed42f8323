"""The Triton kernels and decode graphs on a real GPU (``pytest -m cuda``; skipped with a reason
where no GPU is visible, or without triton). Their logic is checked on CPU under the interpreter
in tests/kernels; here the compiled kernels and graph capture themselves."""

from __future__ import annotations

import pytest
import torch

from matrixinfer.engine.cuda_graphs import DecodeGraphs
from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.backend import select_backend
from matrixinfer.model.loader import load_model

pytestmark = pytest.mark.cuda


def _steps(model, cache, tables):
    g = torch.Generator().manual_seed(3)
    outs = []
    for q_lens, ctx_lens, mode in (([6, 9], [6, 9], "naive"), ([1, 3], [7, 12], "auto"), ([1, 1], [8, 13], "auto")):
        ids = torch.randint(2, model.config.vocab_size, (sum(q_lens),), generator=g).cuda()
        pos = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)]).cuda()
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, cache.block_size, device="cuda", mode=mode)
        with torch.no_grad():
            outs.append(model(ids, pos, meta, cache))
    return outs


def test_triton_backend_matches_pytorch_on_cuda(tiny_v3):
    pytest.importorskip("triton")
    model = load_model(tiny_v3, device="cuda", progress=False)  # float32: kernels in IEEE precision
    cfg = model.config
    tables = torch.tensor([[3, 0, 5, 7], [1, 6, 2, 4]], device="cuda")
    results = {}
    for backend in ("native", "cuda"):
        chosen = select_backend(model, backend)
        assert chosen.get("MLA:cuda", 0) == (cfg.num_hidden_layers if backend == "cuda" else 0)
        cache = PagedLatentCache(model.num_cache_layers, 8, 4, cfg.kv_cache_dim, device="cuda")
        results[backend] = (_steps(model, cache, tables), cache)
    for got, want in zip(results["cuda"][0], results["native"][0]):
        assert (got - want).abs().max().item() < 1e-4
    assert (results["cuda"][1].data - results["native"][1].data).abs().max().item() < 1e-5


def test_decode_graph_replay_equals_eager(tiny_v3):
    pytest.importorskip("triton")
    model = load_model(tiny_v3, device="cuda", progress=False)
    cfg = model.config
    select_backend(model, "cuda")
    caches = [PagedLatentCache(model.num_cache_layers, 12, 4, cfg.kv_cache_dim, device="cuda") for _ in range(2)]
    caches[0].data.normal_(generator=torch.Generator("cuda").manual_seed(5))
    caches[1].data.copy_(caches[0].data)
    eager = DecodeGraphs(model, caches[0], max_batch=8, max_blocks=3, pad_block=11)
    graphs = DecodeGraphs(model, caches[1], max_batch=8, max_blocks=3, pad_block=11)
    graphs.capture()
    assert sorted(graphs.graphs) == graphs.buckets, "every bucket captured (no host sync in the decode step)"
    tables = torch.tensor([[3, 0, 5], [1, 6, 9], [2, 4, 7], [8, 10, 0], [5, 5, 5]], dtype=torch.int32, device="cuda")
    for ctx in ([10, 6, 12, 3, 1], [11, 7, 12]):  # two steps, buckets 8 and 4, the second one's sequences longer
        n = len(ctx)
        ids = torch.arange(5, 5 + n, device="cuda")
        pos = torch.tensor(ctx, device="cuda") - 1
        want = eager.run(ids, pos, tables[:n])
        got = graphs.run(ids, pos, tables[:n])
        assert (got - want).abs().max().item() < 1e-5
    assert (caches[0].data - caches[1].data).abs().max().item() < 1e-5
