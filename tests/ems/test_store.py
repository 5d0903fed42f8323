"""The DRAM store's LRU, quotas and pins against a simple model (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixinfer.ems.arena import ALIGN, align_up
from matrixinfer.ems.store import ArenaFull, DramStore, QuotaExceeded, ValueTooLarge

CAPACITY = 32 * ALIGN
QUOTAS = {"a": 20 * ALIGN, "b": 20 * ALIGN}


class Harness:
    """A store over a bytearray that fills each value with a per-put byte, recording evictions."""

    def __init__(self) -> None:
        self.mem = bytearray(CAPACITY)
        self.evicted: list[tuple[str, bytes]] = []
        self.store = DramStore(CAPACITY, QUOTAS.__getitem__, lambda e: self.evicted.append((e.ns, e.key)))

    def put(self, ns: str, key: bytes, size: int, fill: int) -> None:
        off = self.store.reserve(ns, size)
        self.mem[off:off + size] = bytes([fill]) * size
        self.store.commit(ns, key, off, size)


ops = st.lists(st.tuples(st.sampled_from(["put", "get", "delete"]), st.sampled_from(["a", "b"]),
                         st.integers(0, 7), st.integers(1, 9 * ALIGN)), max_size=80)


@settings(max_examples=120, deadline=None)
@given(ops)
def test_store_evicts_in_lru_order_within_quota(seq):
    h = Harness()
    order: dict[str, list[bytes]] = {"a": [], "b": []}  # model: least to most recently used
    content: dict[tuple[str, bytes], tuple[int, int]] = {}  # model: (size, fill) of live values
    for step, (op, ns, k, size) in enumerate(seq):
        key = bytes([k])
        h.evicted.clear()
        if op == "put":
            h.put(ns, key, size, step % 251)
            for ens, ekey in h.evicted:
                # every eviction takes the least recently used entry of its namespace
                assert order[ens][0] == ekey, (ens, ekey, order[ens])
                order[ens].pop(0)
                del content[(ens, ekey)]
            if key in order[ns]:
                order[ns].remove(key)
            order[ns].append(key)
            content[(ns, key)] = (size, step % 251)
        elif op == "get":
            entry = h.store.get(ns, key)
            assert (entry is not None) == (key in order[ns])
            if entry is not None:
                order[ns].remove(key)
                order[ns].append(key)
                want_size, fill = content[(ns, key)]
                assert entry.size == want_size
                assert h.mem[entry.offset:entry.offset + entry.size] == bytes([fill]) * want_size
        else:
            assert h.store.delete(ns, key) == (key in order[ns])
            if key in order[ns]:
                order[ns].remove(key)
                del content[(ns, key)]
        for name in order:
            assert h.store.keys_in_order(name) == order[name]
            assert h.store.ns_bytes.get(name, 0) <= QUOTAS[name]
            assert h.store.ns_bytes.get(name, 0) == sum(align_up(content[(name, kk)][0]) for kk in order[name])


def test_pinned_entry_survives_eviction_and_replacement():
    h = Harness()
    h.put("a", b"x", 8 * ALIGN, 1)
    entry = h.store.get("a", b"x", pin=True)
    for i in range(10):  # namespace churn far beyond its quota
        h.put("a", bytes([100 + i]), 6 * ALIGN, 2)
    assert h.store.get("a", b"x", touch=False) is entry  # pinned: never evicted
    h.put("a", b"x", 4 * ALIGN, 3)  # replaced while pinned: old bytes stay until unpinned
    assert h.mem[entry.offset:entry.offset + entry.size] == bytes([1]) * entry.size
    used = h.store.ns_bytes["a"]
    h.store.unpin(entry)
    assert h.store.ns_bytes["a"] == used - 8 * ALIGN


def test_refusals_name_the_limit():
    h = Harness()
    with pytest.raises(QuotaExceeded, match="namespace 'a'"):
        h.store.reserve("a", 21 * ALIGN)
    with pytest.raises(ValueTooLarge, match="arena"):
        h.store.reserve("a", CAPACITY + 1)
    h.put("a", b"p", 16 * ALIGN, 1)
    h.store.get("a", b"p", pin=True)
    h.put("b", b"q", 16 * ALIGN, 1)
    h.store.get("b", b"q", pin=True)
    with pytest.raises(ArenaFull, match="pinned"):
        h.store.reserve("b", 4 * ALIGN)


def test_entry_read_through_the_shared_index_gets_a_second_chance():
    read_marks = {b"k0"}  # what the shared index's read words say
    evicted: list[bytes] = []

    def was_read(entry) -> bool:
        hit = entry.key in read_marks
        read_marks.discard(entry.key)
        return hit

    store = DramStore(4 * ALIGN, lambda ns: 4 * ALIGN, lambda e: evicted.append(e.key), was_read=was_read)
    for i in range(4):
        store.commit("a", b"k%d" % i, store.reserve("a", ALIGN), ALIGN)
    store.commit("a", b"k4", store.reserve("a", ALIGN), ALIGN)
    assert evicted == [b"k1"]  # k0 was oldest but read meanwhile: it moved to the recent end
    read_marks.update({b"k2", b"k3", b"k4", b"k0"})
    store.commit("a", b"k5", store.reserve("a", ALIGN), ALIGN)
    assert evicted == [b"k1", b"k2"]  # all read: after one round of second chances the oldest goes
