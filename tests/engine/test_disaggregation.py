"""The engine's KV seams: reservations expire, attach continues a handed-off sequence, and a KV
connector loads prefix blocks beyond the local hit."""

from __future__ import annotations

import time

import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import write_byte_tokenizer
from tests.checkpoints import make_checkpoint


def _engine(tmp_path, connector: KVConnector | None = None) -> LLMEngine:
    ck = make_checkpoint(tmp_path / "m", "v3", seed=2, vocab_size=264, bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(ck)
    cfg = EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=2 << 20, block_size=8)
    return LLMEngine(cfg, connector=connector)


class Capture(KVConnector):
    """Takes every request over after its first token, keeping its prompt's KV (a prefill instance's handoff)."""

    def __init__(self) -> None:
        self.captured: dict[str, object] = {}

    def take_over(self, seq, token, logprob):
        self.captured = {"kv": self.cache.read_tokens(seq.block_table, len(seq.prompt_ids)), "token": token}
        return True


def continue_attached(engine: LLMEngine, rid: str, prompt: list[int], token: int, params: SamplingParams) -> list[int]:
    """Attach a request whose KV was written into its reservation, run it to the end: its tokens."""
    got = list(engine.attach(rid, prompt, token, None, params).token_ids)
    while engine.has_work():
        for out in engine.step():
            got.extend(out.token_ids)
    return got


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
    capture = Capture()
    a, b, ref = _engine(tmp_path, capture), _engine(tmp_path), _engine(tmp_path)
    prompt = torch.randint(3, 250, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expect = ref.generate([prompt], params)[0]
    a.add_request("x", prompt, params)
    while not capture.captured:
        outs = a.step()
    assert outs[0].handed_off and not a.has_work() and a.blocks.num_used == 0
    assert b.reserve("x", len(prompt), timeout=10) is not None
    kv = capture.captured["kv"]
    assert b.write_reserved("x", 0, kv[:2]) and b.write_reserved("x", 2, kv[2:])  # in layer chunks
    assert not b.write_reserved("y", 0, kv)  # no reservation: the bytes are dropped
    assert continue_attached(b, "x", prompt, capture.captured["token"], params) == expect
    assert b.blocks.num_used == 0 and not b.has_reservation("x")


class DictCache(KVConnector):
    """An in-memory external prefix cache (what EMS is to a prefill instance)."""

    def __init__(self, blocks: dict[bytes, torch.Tensor]) -> None:
        self.blocks = blocks

    def num_external_blocks(self, seq, hashes):
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def after_alloc(self, seq, hashes, block_ids):
        n = self.num_external_blocks(seq, hashes)
        for h, b in zip(hashes[:n], block_ids):
            self.cache.block_view(b).copy_(self.blocks[h])
        return n

    def save(self, seq, hashes):
        full = min(len(hashes), len(seq.prompt_ids) // self.cache.block_size)
        for h, b in zip(hashes[:full], seq.block_table):
            self.blocks.setdefault(h, self.cache.block_view(b).clone())


def test_external_prefix_cache_beyond_the_local_hit(tmp_path):
    """Engine A fills the external cache; engine B, holding a shorter local hit, loads the rest."""
    shared: dict[bytes, torch.Tensor] = {}
    a, b = _engine(tmp_path, DictCache(shared)), _engine(tmp_path, DictCache(shared))
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 250, (48,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    long_prompt = prefix + torch.randint(3, 250, (9,), generator=g).tolist()
    expect = a.generate([long_prompt], params)[0]
    assert len(shared) == 7  # 57 prompt tokens: 7 full blocks of 8
    b.generate([prefix[:16] + [7] * 5], params)  # B's own cache now holds the first 2 blocks
    local0, ext0 = b.blocks.hit_tokens, b.external_hit_tokens
    got = b.generate([long_prompt], params)[0]
    assert got == expect
    assert b.blocks.hit_tokens - local0 == 16  # 2 blocks from B's own prefix cache
    assert b.external_hit_tokens - ext0 == 7 * 8 - 16  # the other 5 from the external cache
