"""The decode-graph runner's buckets and padding (matrixinfer.engine.cuda_graphs), run eagerly on
CPU tensors with the model's attention on the Triton kernels under the interpreter; capture and
replay themselves need a GPU (tests/cuda)."""

from __future__ import annotations

import pytest
import torch

# isort: off
from tests.kernels.triton_interpreter import interpret  # noqa: F401  (sets TRITON_INTERPRET=1 before triton loads)
# isort: on
from matrixinfer.engine.cuda_graphs import DecodeGraphs, bucket_for, decode_buckets
from matrixinfer.model.attention import AttentionMetadata, Int8PagedLatentCache, PagedLatentCache
from matrixinfer.model.backend import select_backend
from matrixinfer.model.loader import load_model


def test_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(3) == [1, 2, 3]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_buckets(100)[-2:] == [96, 100]
    assert [bucket_for(n, decode_buckets(64)) for n in (1, 3, 5, 9, 17, 64)] == [1, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="exceeds the largest"):
        bucket_for(65, decode_buckets(64))


def test_padded_decode_step_matches_the_pytorch_step(tiny_v3):
    """Three sequences decoded in the 4-bucket (one padding row) give the PyTorch path's hidden
    states and cache; the padding row writes only the scratch block. 3-6 s under the interpreter on 2 loaded cores."""
    model = load_model(tiny_v3, progress=False)
    cfg = model.config
    bs, pad_block = 4, 9
    cache = PagedLatentCache(model.num_cache_layers, 10, bs, cfg.kv_cache_dim)
    cache.data.normal_(generator=torch.Generator().manual_seed(4))  # earlier tokens' latents
    before = cache.data.clone()
    expect_cache = PagedLatentCache(model.num_cache_layers, 10, bs, cfg.kv_cache_dim)
    expect_cache.data.copy_(cache.data)
    tables = torch.tensor([[3, 0, 5], [1, 6, 0], [2, 4, 7]], dtype=torch.int32)
    ctx = [10, 6, 12]
    ids = torch.tensor([5, 17, 33])
    pos = torch.tensor(ctx) - 1

    select_backend(model, "native")
    with pytest.raises(ValueError, match="cuda"):
        DecodeGraphs(model, cache, max_batch=4, max_blocks=3, pad_block=pad_block)
    with torch.no_grad():
        want = model(ids, pos, AttentionMetadata.build([1, 1, 1], ctx, tables, bs), expect_cache)

    select_backend(model, "cuda")
    with pytest.raises(ValueError, match="INT8"):
        DecodeGraphs(model, Int8PagedLatentCache(model.num_cache_layers, 10, bs, cfg.kv_cache_dim, cfg.kv_lora_rank),
                     max_batch=4, max_blocks=3, pad_block=pad_block)
    graphs = DecodeGraphs(model, cache, max_batch=4, max_blocks=3, pad_block=pad_block)
    assert graphs.buckets == [1, 2, 4]
    got = graphs.run(ids, pos, tables)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    pad_rows = slice(pad_block * bs, (pad_block + 1) * bs)
    assert (cache.data[:, :pad_block * bs] - expect_cache.data[:, :pad_block * bs]).abs().max().item() < 1e-5
    assert not torch.equal(cache.data[:, pad_rows], before[:, pad_rows])  # the padding row wrote there
    assert int(graphs.tok_nkeys[3]) == 1 and int(graphs.slot_mapping[3]) == pad_block * bs
