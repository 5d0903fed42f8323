"""The INT8 latent KV cache (``--kv-cache-dtype int8``): what it stores, how much it holds, that
attention through it stays close to a float cache, and that P/D handoff and the external prefix
cache move its blocks without changing any token."""

from __future__ import annotations

import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.attention import AttentionMetadata, Int8PagedLatentCache, make_cache
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.model.loader import load_model
from tests.checkpoints import make_checkpoint
from tests.engine.test_disaggregation import Capture, DictCache, continue_attached


def _engine(ck, kv_cache_dtype: str, connector=None) -> LLMEngine:
    cfg = EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=2 << 20, block_size=8,
                       kv_cache_dtype=kv_cache_dtype)
    return LLMEngine(cfg, connector=connector)


def _checkpoint(tmp_path):
    ck = make_checkpoint(tmp_path / "m", "v3", seed=2, vocab_size=264, bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(ck)
    return ck


def test_values_and_scales_per_token_and_part():
    g = torch.Generator().manual_seed(0)
    cache = Int8PagedLatentCache(2, 4, 4, 44, split=32)
    latent = torch.cat([torch.randn(10, 32, generator=g), 50 * torch.randn(10, 12, generator=g)], dim=1)
    latent[3] *= 1e-3  # a small token keeps its own resolution
    slots = torch.tensor([0, 1, 2, 3, 5, 6, 7, 9, 10, 11])
    cache.write(1, slots, latent)
    got = cache.gather(1, slots)
    for part in (slice(0, 32), slice(32, 44)):
        step = latent[:, part].abs().amax(dim=1, keepdim=True) / 127
        err = (got[:, part] - latent[:, part]).abs()
        assert (err <= step / 2 + 1e-7).all()
        assert err.max() > 0  # values really are quantized
    assert cache.data.dtype is torch.uint8 and cache.data.shape[-1] == 52  # 44 values + 8 bytes of scales
    # what the KV handoff reads, written into another cache, gives back the same bytes
    other = Int8PagedLatentCache(2, 4, 4, 44, split=32)
    other.write_tokens([0, 1, 2], cache.read_tokens([0, 1, 2], 12))
    assert torch.equal(other.data[:, :12], cache.data[:, :12])


def test_int8_cache_holds_four_times_the_blocks_of_float32(tmp_path):
    ck = _checkpoint(tmp_path)
    f32, i8 = _engine(ck, "auto"), _engine(ck, "int8")
    dim = f32.model.config.kv_cache_dim
    assert i8.runner.num_blocks / f32.runner.num_blocks > 4 * dim / (dim + 8 + 3) - 0.05
    assert isinstance(i8.runner.kv_cache, Int8PagedLatentCache)


@torch.no_grad()
def test_attention_through_the_int8_cache_stays_close(tiny_v3):
    """Teacher-forced logits of a prefill and decode steps through an INT8 cache vs a float32 cache."""
    model = load_model(tiny_v3, progress=False)
    seqs = torch.randint(2, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(4))
    logits = {}
    for kind in ("auto", "int8"):
        cfg = model.config
        cache = make_cache(kind, model.num_cache_layers, 3 * 3, 8, cfg.kv_cache_dim, cfg.kv_lora_rank,
                           torch.float32, "cpu")
        tables = torch.arange(9).view(3, 3)
        out = [model.compute_logits(model(seqs[:, :20].reshape(-1), torch.arange(20).repeat(3),
                                          AttentionMetadata.build([20] * 3, [20] * 3, tables, 8), cache))]
        for t in range(20, 24):  # decode steps
            meta = AttentionMetadata.build([1] * 3, [t + 1] * 3, tables, 8)
            out.append(model.compute_logits(model(seqs[:, t], torch.full((3,), t), meta, cache)))
        logits[kind] = torch.cat(out)
    ref, q = logits["auto"], logits["int8"]
    rel = ((q - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_handoff_and_external_cache_keep_every_token(tmp_path):
    """INT8 blocks moved by the P/D handoff (dequantized, quantized again) and by an external prefix
    cache (bytes) continue exactly as the INT8 engine that computed them."""
    ck = _checkpoint(tmp_path)
    prompt = torch.randint(3, 250, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expect = _engine(ck, "int8").generate([prompt], params)[0]

    capture = Capture()
    a, b = _engine(ck, "int8", capture), _engine(ck, "int8")
    a.add_request("x", prompt, params)
    while not capture.captured:
        a.step()
    assert b.reserve("x", len(prompt), timeout=10) is not None
    assert b.write_reserved("x", 0, capture.captured["kv"])
    assert continue_attached(b, "x", prompt, capture.captured["token"], params) == expect

    shared: dict[bytes, torch.Tensor] = {}
    c, d = _engine(ck, "int8", DictCache(shared)), _engine(ck, "int8", DictCache(shared))
    assert c.generate([prompt], params)[0] == expect
    assert len(shared) == 3 and next(iter(shared.values())).dtype is torch.uint8
    assert d.generate([prompt], params)[0] == expect
    assert d.external_hit_tokens == 24
