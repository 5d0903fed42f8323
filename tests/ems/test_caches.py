"""Cache layouts on a real server: context cache (KV blocks) and model cache (weights)."""

from __future__ import annotations

import numpy as np
import pytest

from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.connection import server_stats
from matrixinfer.ems.context_cache import ContextCache
from matrixinfer.ems.model_cache import ModelCache
from matrixinfer.prefix_hash import chain_hashes

BLOCK = 16
BLOCK_BYTES = 4096  # one KV block's bytes in this test


def _kv(block_hash: bytes) -> np.ndarray:
    """A deterministic fake KV block for a hash (what prefill would have computed)."""
    return np.frombuffer((block_hash * (BLOCK_BYTES // len(block_hash))), np.uint8).copy()


def test_context_cache_shares_prefixes_and_loads_into_buffers(ems_servers):
    server = ems_servers("16M")
    with EmsClient([server.addr], namespace="deepseek-v3/tenant-a") as client:
        cache = ContextCache(client, BLOCK)
        prompt_a = list(range(100))  # 6 full blocks
        prompt_b = list(range(64)) + [999] * 40  # shares the first 4 blocks with a
        ha, hb = cache.block_hashes(prompt_a), cache.block_hashes(prompt_b)
        assert ha == chain_hashes(prompt_a, BLOCK, "deepseek-v3/tenant-a")  # the engine's own hash
        assert cache.lookup_prefix(ha) == 0
        assert cache.store_blocks_async(ha, [_kv(h) for h in ha]).result(timeout=10) == 6
        assert cache.lookup_prefix(hb) == 4
        assert cache.store_blocks(hb, [_kv(h) for h in hb]) == 2  # the shared 4 are stored once
        assert server_stats(server.addr)["namespaces"]["deepseek-v3/tenant-a"]["puts"] == 8

        outs = [np.zeros(BLOCK_BYTES, np.uint8) for _ in hb]
        assert cache.load_blocks(hb, outs) == len(hb)
        assert all(np.array_equal(o, _kv(h)) for o, h in zip(outs, hb))
        client.delete(ContextCache.key(hb[2]))  # a hole: only the blocks before it count
        assert cache.lookup_prefix(hb) == 2
        assert cache.load_blocks(hb, outs) == 2


def test_model_cache_versions_and_model_lru(ems_servers):
    server = ems_servers("32M")
    rng = np.random.default_rng(0)

    def weights(seed: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        return {"embed": r.standard_normal((64, 32)).astype(np.float32),
                "layers.0.mlp": r.integers(-128, 127, (128,), dtype=np.int8)}

    nbytes = sum(a.nbytes for a in weights(0).values())
    with EmsClient([server.addr], namespace="models") as client:
        cache = ModelCache(client, capacity=2 * nbytes)
        assert not cache.check("ds", "v1") and cache.load("ds", "v1") is None
        calls = []
        assert cache.prefetch("ds", "v1", lambda: calls.append(1) or weights(1)) == nbytes
        assert cache.prefetch("ds", "v1", lambda: calls.append(1) or weights(1)) == 0  # already there
        assert calls == [1] and cache.check("ds", "v1")
        loaded = cache.load("ds", "v1")
        assert all(np.array_equal(loaded[k], v) for k, v in weights(1).items())
        assert loaded["embed"].dtype == np.float32 and loaded["embed"].shape == (64, 32)

        assert cache.load("ds", "v2") is None  # a new version never serves v1's tensors
        cache.prefetch("ds", "v2", weights(2))
        assert np.array_equal(cache.load("ds", "v2")["embed"], weights(2)["embed"])
        assert np.array_equal(cache.load("ds", "v1")["embed"], weights(1)["embed"])  # v1 most recent

        cache.prefetch("other", "v1", weights(3))  # over capacity: the LRU *model* (ds@v2) goes whole
        assert cache.lru_order() == ["ds@v1", "other@v1"]
        assert not cache.check("ds", "v2") and cache.load("ds", "v2") is None
        assert not client.exists(b"model/ds@v2/t/embed") and not client.exists(b"model/ds@v2/t/layers.0.mlp")
        assert cache.check("ds", "v1") and cache.check("other", "v1")
        with pytest.raises(ValueError, match="capacity"):
            cache.prefetch("huge", "v1", {"w": rng.standard_normal(10 * nbytes)})


def test_model_cache_round_trips_torch_bf16(ems_servers):
    torch = pytest.importorskip("torch")
    server = ems_servers("8M")
    with EmsClient([server.addr], namespace="models") as client:
        cache = ModelCache(client)
        w = torch.randn(16, 8).to(torch.bfloat16)
        cache.prefetch("tiny", "1", {"w": w})
        assert torch.equal(cache.load("tiny", "1")["w"], w)
