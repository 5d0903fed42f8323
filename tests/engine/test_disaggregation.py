"""The engine's decode-side disaggregation hooks: reservations expire, attach continues a sequence."""

from __future__ import annotations

import time

import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.external_cache import ExternalPrefixCache
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import write_byte_tokenizer
from tests.checkpoints import make_checkpoint


def _engine(tmp_path) -> LLMEngine:
    ck = make_checkpoint(tmp_path / "m", "v3", seed=2, vocab_size=264, bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(ck)
    return LLMEngine(EngineConfig(model=str(ck), kv_cache_memory=2 << 20, block_size=8))


def test_unclaimed_reservation_is_reclaimed_after_its_deadline(tmp_path):
    eng = _engine(tmp_path)
    free = eng.blocks.num_free
    assert eng.reserve("r1", 40, timeout=0.05) is not None
    assert eng.blocks.num_free == free - 6  # 41 tokens in blocks of 8
    assert eng.reap_reservations() == []
    time.sleep(0.1)
    assert eng.reap_reservations() == ["r1"]
    assert eng.blocks.num_free == free


def test_attach_continues_exactly_like_local_prefill(tmp_path):
    """KV computed by one engine, copied into another's reserved blocks, continues identically."""
    a, b = _engine(tmp_path), _engine(tmp_path)
    prompt = torch.randint(3, 250, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expect = a.generate([prompt], params)[0]
    a.add_request("x", prompt, params)
    captured = {}

    def handoff(seq, token, logprob):
        bs = a.cfg.block_size
        pos = torch.arange(len(seq.prompt_ids))
        slots = torch.tensor(seq.block_table)[pos // bs] * bs + pos % bs
        captured["kv"] = a.runner.kv_cache.data.index_select(1, slots).clone()
        captured["token"] = token

    a.handoff = handoff
    while "kv" not in captured:
        a.step()
    blocks = b.reserve("x", len(prompt), timeout=10)
    bs = b.cfg.block_size
    pos = torch.arange(len(prompt))
    slots = torch.tensor(blocks)[pos // bs] * bs + pos % bs
    b.runner.kv_cache.data.index_copy_(1, slots, captured["kv"])
    first = b.attach("x", prompt, captured["token"], None, params)
    got = list(first.token_ids)
    while b.has_work():
        for out in b.step():
            got.extend(out.token_ids)
    assert got == expect
    assert b.blocks.num_used == 0 and not b.reservations


class DictCache(ExternalPrefixCache):
    """An in-memory external prefix cache (what EMS is to a prefill instance)."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, torch.Tensor] = {}

    def lookup(self, hashes):
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def load(self, hashes, blocks):
        n = self.lookup(hashes)
        for h, dst in zip(hashes[:n], blocks):
            dst.copy_(self.blocks[h])
        return n

    def store_async(self, hashes, blocks):
        for h, b in zip(hashes, blocks):
            self.blocks[h] = b.clone()


def test_external_prefix_cache_beyond_the_local_hit(tmp_path):
    """Engine A fills the external cache; engine B, holding a shorter local hit, loads the rest."""
    a, b = _engine(tmp_path), _engine(tmp_path)
    ext = DictCache()
    a.external = b.external = ext
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 250, (48,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    long_prompt = prefix + torch.randint(3, 250, (9,), generator=g).tolist()
    expect = a.generate([long_prompt], params)[0]
    assert len(ext.blocks) == 7  # 57 prompt tokens: 7 full blocks of 8
    b.generate([prefix[:16] + [7] * 5], params)  # B's own cache now holds the first 2 blocks
    local0, ext0 = b.blocks.hit_tokens, b.external_hit_tokens
    got = b.generate([long_prompt], params)[0]
    assert got == expect
    assert b.blocks.hit_tokens - local0 == 16  # 2 blocks from B's own prefix cache
    assert b.external_hit_tokens - ext0 == 7 * 8 - 16  # the other 5 from the external cache
