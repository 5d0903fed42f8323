"""Paged blocks with prefix caching: sharing, LRU eviction of freed cached blocks, counters."""

from __future__ import annotations

from matrixinfer.engine.block_manager import BlockManager
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.engine.sequence import Sequence
from matrixinfer.prefix_hash import chain_hashes


def seq(rid: str, ids: list[int]) -> Sequence:
    return Sequence(rid, ids, SamplingParams())


def run(bm: BlockManager, s: Sequence) -> None:
    """Admit, compute the whole prompt and name its full blocks."""
    hit, _ = bm.lookup(s)
    bm.admit(s, hit)
    bm.reserve(s, s.num_tokens)
    s.num_computed = s.num_tokens
    bm.commit(s)


def test_identical_prefixes_share_blocks_and_count_hits():
    bm = BlockManager(16, 4, "m")
    a = seq("a", list(range(10)))
    run(bm, a)
    assert bm.hit_tokens == 0
    b = seq("b", list(range(8)) + [99, 98, 97])
    hit, revive = bm.lookup(b)
    assert hit == a.block_table[:2] and revive == 0
    run(bm, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.ref_count[a.block_table[0]] == 2
    assert bm.hit_tokens == 8
    assert bm.num_used == 3 + 1  # a: 3 blocks, b: 1 new block


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, 4, "m")
    a = seq("a", list(range(9)))  # 3 blocks, 2 full
    run(bm, a)
    bm.free(a)
    assert bm.num_free == 4
    again = seq("a2", list(range(9)))
    hit, revive = bm.lookup(again)
    assert len(hit) == 2 and revive == 2  # cached but free: reviving uses free blocks
    # a new unrelated sequence needing all 4 blocks evicts the cached ones
    c = seq("c", [50 + i for i in range(16)])
    run(bm, c)
    assert bm.lookup(again)[0] == []


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(8, 4, "m")
    run(bm, seq("a", list(range(8))))
    hit, _ = bm.lookup(seq("b", list(range(8))))
    assert len(hit) == 1  # the last block is recomputed to produce logits


def test_namespaces_do_not_share():
    one, two = BlockManager(8, 4, "model-a"), BlockManager(8, 4, "model-b")
    s = seq("x", list(range(8)))
    assert one.block_hashes(s, 2) != two.block_hashes(seq("y", list(range(8))), 2)


def test_hash_chain_matches_the_shared_definition():
    bm = BlockManager(8, 4, "ns")
    s = seq("x", list(range(12)))
    assert bm.block_hashes(s, 3) == chain_hashes(list(range(12)), 4, "ns")
