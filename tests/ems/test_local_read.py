"""Same-host reads of many keys at once: the batched index read serves exactly what one-at-a-time
reads serve, and a value rewritten during the batch's copies is caught for that key alone."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from matrixinfer.ems import index as ix
from matrixinfer.ems import local_read, native
from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.index import IndexReader, IndexWriter, key_tag, key_tags
from matrixinfer.ems.local_read import BATCH_MIN, LocalReader

pytestmark = pytest.mark.skipif(not ix.SUPPORTED, reason="shared index reads need x86-64 memory ordering")

CAPACITY = 1 << 20


class Segment:
    """An arena and its index in one bytearray, written as the server writes them."""

    def __init__(self, slots: int = 4096) -> None:
        self.arena = memoryview(bytearray(CAPACITY + ix.index_bytes(slots)))
        self.writer = IndexWriter(self.arena[CAPACITY:], slots)
        self.reader = IndexReader(self.arena[CAPACITY:], slots, CAPACITY)
        self.salt = b"fixed salt: no bucket overflows"  # with 4096 slots, for these tests' keys
        self.local = LocalReader(self.reader, self.arena, self.salt)
        self.next_off = 0

    def put(self, key: bytes, value: bytes) -> int:
        off, self.next_off = self.next_off, self.next_off + (len(value) + 63) // 64 * 64
        self.arena[off:off + len(value)] = value
        self.writer.publish("ns", key, key_tag(self.salt, key), off, len(value))
        return off

    def read(self, how: str, keys: list[bytes], outs: list | None) -> tuple[list, list, int, int]:
        results: list[object] = [None] * len(keys)
        rest, hits, conflicts = getattr(self.local, how)(keys, outs, results)
        return results, rest, hits, conflicts


@pytest.fixture(params=["native", "python"])
def helpers(request, monkeypatch):
    """Run a test with the C helpers and with the hashlib and Python loop that stand in for them."""
    if request.param == "native" and not native.available():
        pytest.skip("no C compiler or Python headers for the EMS read helpers")
    if request.param == "python":
        monkeypatch.setattr(native.LIBRARY, "load", lambda: None)
    return request.param


def test_native_tags_are_the_index_tags():
    if not native.available():
        pytest.skip("no C compiler or Python headers for the EMS read helpers")
    rng = np.random.default_rng(0)
    keys = [b"", b"k", *(rng.bytes(n) for n in (127, 128, 129, 256, 257, 1000)), *(rng.bytes(n) for n in range(200))]
    for salt in (b"s", rng.bytes(16), rng.bytes(64)):
        assert (native.tags(salt, keys) == key_tags(salt, keys)).all()
    assert native.tags(b"s", [b"k", bytearray(b"k")]) is None  # not bytes: the caller uses hashlib


def test_key_tags_and_find_many_agree_with_the_single_forms():
    seg = Segment(slots=64)  # a small table: probes see full buckets and several ways
    keys = [b"k%d" % i for i in range(3 * 64)]  # more keys than slots: some lose theirs
    for i, key in enumerate(keys):
        seg.put(key, bytes([i % 251]) * (10 + i))
    tags = key_tags(seg.salt, keys + [b"absent"])
    assert [tuple(map(int, t)) for t in tags] == [key_tag(seg.salt, k) for k in keys + [b"absent"]]
    seg.writer.words[ix.HEADER_WORDS + 5 * ix.SLOT_WORDS] += 1  # a slot mid-rewrite (odd seq) is no hit
    single = [seg.reader.find(tuple(map(int, t))) for t in tags]
    rows, words, seqs, offsets, sizes = seg.reader.find_many(tags)
    assert rows.tolist() == [i for i, f in enumerate(single) if f is not None]
    assert list(zip(words.tolist(), seqs.tolist(), offsets.tolist(), sizes.tolist())) == [f for f in single if f]
    assert sum(f is None for f in single) == len(keys) - 64 + 2  # lost slots, the odd one, "absent"


def test_batch_serves_what_single_reads_serve_with_misses_and_small_buffers(helpers):
    seg = Segment()
    keys = [b"k%d" % i for i in range(40)]
    values = {k: os.urandom(100 + 37 * i) for i, k in enumerate(keys) if i % 5}  # every 5th key: a miss
    for k, v in values.items():
        seg.put(k, v)
    sizes = [len(values.get(k, b"")) + (-1 if i % 7 == 3 else 9 * (i % 2)) for i, k in enumerate(keys)]
    outs = [bytearray(max(n, 0)) for n in sizes]  # some exact, some larger, some one byte short
    batch = seg.read("read_batch", keys, outs)
    outs_each = [bytearray(len(o)) for o in outs]
    assert batch == seg.read("read_each", keys, outs_each) and outs == outs_each
    results, rest, hits, conflicts = batch
    short = [i for i, k in enumerate(keys) if k in values and sizes[i] < len(values[k])]
    assert rest == sorted([i for i, k in enumerate(keys) if k not in values] + short) and short
    assert hits == len(values) - len(short) and conflicts == 0
    for i, k in enumerate(keys):
        if i not in rest:
            assert results[i] == len(values[k]) and outs[i][:results[i]] == values[k]
    assert seg.read("read_batch", keys, None)[0] == [bytearray(values[k]) if k in values else None for k in keys]


def test_large_values_of_a_large_batch_copy_on_threads(helpers, monkeypatch):
    monkeypatch.setattr(local_read, "PARALLEL_COPY_MIN", 8000)  # scaled down: 1 MB values, 32 MB batches
    monkeypatch.setattr(local_read, "PARALLEL_VALUE_MIN", 2000)
    threaded = []
    parallel_copy = local_read.parallel_copy
    monkeypatch.setattr(local_read, "parallel_copy", lambda pairs: threaded.append(len(pairs)) or parallel_copy(pairs))
    seg = Segment()
    keys = [b"k%d" % i for i in range(BATCH_MIN)]
    values = [bytes([i]) * (3000 if i % 4 == 0 else 100) for i in range(len(keys))]
    for k, v in zip(keys, values):
        seg.put(k, v)
    outs = [bytearray(len(v)) for v in values]
    assert seg.read("read_batch", keys, outs) == ([len(v) for v in values], [], len(keys), 0)
    assert outs == values and threaded == [len(keys) // 4]  # the four 3000-byte values, on threads


def test_a_value_rewritten_during_the_batch_copy_is_caught_for_that_key_only(helpers):
    seg = Segment()
    keys = [b"k%d" % i for i in range(BATCH_MIN * 2)]
    offs = {k: seg.put(k, bytes([i]) * 1000) for i, k in enumerate(keys)}
    raced = keys[7]
    find_many = seg.reader.find_many

    def racing_find_many(tags):  # after the lookup, before the copy: raced's block is rewritten
        found = find_many(tags)
        seg.writer.withdraw("ns", raced)
        seg.arena[offs[raced]:offs[raced] + 1000] = b"\xff" * 1000  # the freed block's next owner
        seg.put(raced, b"\x07" * 1000)
        return found

    seg.reader.find_many = racing_find_many
    outs = [bytearray(1000) for _ in keys]
    results, rest, hits, conflicts = seg.read("read_batch", keys, outs)
    assert rest == [7] and results[7] is None and conflicts == 1 and hits == len(keys) - 1
    assert outs[7] == b"\xff" * 1000  # the torn copy was real, and it was not reported as a value
    assert all(results[i] == 1000 and outs[i] == bytes([i]) * 1000 for i in range(len(keys)) if i != 7)
    assert [seg.writer.take_read("ns", k) for k in keys] == [k != raced for k in keys]  # marks for reads only


def test_batched_get_through_a_server_races_and_mixes(ems_servers, helpers):
    server = ems_servers("16M")
    keys = [f"k{i}" for i in range(BATCH_MIN * 2)]
    with EmsClient([server.addr], namespace="batch") as reader, \
            EmsClient([server.addr], namespace="batch", fast_path=False) as writer:
        writer.mput([(k, bytes([i]) * 20_000) for i, k in enumerate(keys)])
        conn = reader._conn(server.addr)
        find_many = conn.index.find_many

        def racing_find_many(tags):  # k3 is replaced between the batch's lookup and its copies
            conn.index.find_many = find_many
            found = find_many(tags)
            writer.put("k3", b"\x99" * 20_000)
            return found

        conn.index.find_many = racing_find_many
        kinds = [lambda: np.zeros(20_000, np.uint8), lambda: np.zeros(10_000, np.float16), lambda: bytearray(20_000),
                 lambda: torch.zeros(20_000, dtype=torch.uint8)]  # torch tensors expose no buffer: a Python copy
        outs = [kinds[i % 4]() for i in range(len(keys))]
        assert reader.mget(keys, outs) == [20_000] * len(keys)
        assert conn.reads == {"index": len(keys) - 1, "conflict": 1, "lease": 1}  # k3 alone, by lease
        got = [bytes(memoryview(o.numpy() if isinstance(o, torch.Tensor) else o).cast("B")) for o in outs]
        assert got == [b"\x99" * 20_000 if i == 3 else bytes([i]) * 20_000 for i in range(len(keys))]
        mixed = keys[:10] + ["absent", "also-absent"] + keys[10:]
        assert reader.mget(mixed) == [reader.get(k) for k in mixed]  # misses are None, as singly
        outs = [bytearray(20_000) for _ in mixed]
        outs[4] = bytearray(100)
        with pytest.raises(ValueError, match="'k4' holds 100 bytes"):  # as a single get_into reports
            reader.mget(mixed, outs)


def test_helpers_off_by_environment(monkeypatch):
    """MATRIXINFER_EMS_NATIVE=0 at the first use: no helpers, and callers fall back."""
    native.LIBRARY.forget()
    monkeypatch.setenv("MATRIXINFER_EMS_NATIVE", "0")
    try:
        assert not native.available()
        assert native.tags(b"s", [b"k"]) is None
    finally:
        monkeypatch.undo()
        native.LIBRARY.forget()
