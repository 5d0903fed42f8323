"""The shared index: same-host reads without a round trip never return a torn, stale or foreign
value, and fall back to the leased path whenever the index cannot vouch for one."""

from __future__ import annotations

import time

import pytest

from matrixinfer.ems import index as ix
from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.connection import server_stats
from matrixinfer.ems.index import IndexReader, IndexWriter, key_tag
from matrixinfer.ems.service import EmsService, Session

pytestmark = pytest.mark.skipif(not ix.SUPPORTED, reason="shared index reads need x86-64 memory ordering")


def _pair(slots: int = 16) -> tuple[IndexWriter, IndexReader]:
    region = memoryview(bytearray(ix.index_bytes(slots)))
    return IndexWriter(region, slots), IndexReader(region, slots, capacity=1 << 20)


def test_full_bucket_gives_up_a_slot_and_that_key_reads_by_rpc():
    writer, reader = _pair()
    tags = [(2 * i + 1, 7) for i in range(ix.WAYS + 1)]  # same tag_hi: one bucket
    for i, tag in enumerate(tags):
        writer.publish("ns", b"k%d" % i, tag, offset=64 * i, size=10 + i)
    found = [reader.find(t) for t in tags]
    assert sum(f is None for f in found) == 1  # exactly one key lost its slot
    assert all(f[2:] == (64 * i, 10 + i) for i, f in enumerate(found) if f is not None)
    lost = next(i for i, f in enumerate(found) if f is None)
    assert not writer.is_published("ns", b"k%d" % lost)
    writer.withdraw("ns", b"k%d" % lost)  # withdrawing a key without a slot is harmless
    assert [reader.find(t) for t in tags] == found


def test_slot_changes_before_a_block_can_be_reused():
    svc = EmsService(1 << 20)
    try:
        session = Session()
        svc.open(session, "ns", "")
        reader = IndexReader(svc.arena.extra_view, svc.index_slots, svc.arena.extra_offset)
        tag = key_tag(svc.salt_of("ns"), b"k")

        def put(key: bytes, value: bytes) -> int:
            off = svc.reserve(session, len(value))
            svc.view[off:off + len(value)] = value
            svc.commit(session, key, off, len(value))
            return off

        off = put(b"k", b"a" * 1000)
        word, seq, found_off, size = reader.find(tag)
        assert (found_off, size) == (off, 1000) and reader.unchanged(word, seq)
        pinned = svc.lookup(session, [b"k"])  # a leased reader: the block stays, the slot does not
        put(b"k", b"b" * 1000)
        assert not reader.unchanged(word, seq)
        assert reader.find(tag)[2] != off  # the new value is elsewhere; the old block is still pinned
        svc.unpin(pinned)
        word, seq, new_off, _ = reader.find(tag)
        svc.delete(session, [b"k"])
        assert not reader.unchanged(word, seq) and reader.find(tag) is None
        assert put(b"other", b"c" * 1000) in (off, new_off)  # freed blocks are reused at once
        svc.shutdown()
        assert not reader.is_open()
    finally:
        svc.shutdown()


def test_value_replaced_during_an_index_read_is_never_returned(ems_servers):
    server = ems_servers("8M")
    old, new, other = (bytes([b]) * 200_000 for b in (1, 2, 3))
    with EmsClient([server.addr], namespace="race") as reader, \
            EmsClient([server.addr], namespace="race", fast_path=False) as writer:
        writer.put("k", old)
        conn = reader._conn(server.addr)
        assert reader.get("k") == old and conn.reads["index"] == 1
        out = bytearray(200_000)
        find, unchanged, seen = conn.index.find, conn.index.unchanged, {}

        def racing_find(tag):  # between the lookup and the copy, k's block is freed and reused
            found = find(tag)
            conn.index.find = find
            writer.delete("k")
            writer.put("other", other)
            writer.put("k", new)
            assert find(key_tag(conn.salt, b"other"))[2] == found[2]  # the copy will read other's bytes
            return found

        def checking_unchanged(word, seq):
            seen["copied"], seen["valid"] = bytes(out[:4]), unchanged(word, seq)
            return seen["valid"]

        conn.index.find, conn.index.unchanged = racing_find, checking_unchanged
        assert reader.get_into("k", out) == 200_000
        assert seen == {"copied": other[:4], "valid": False}  # the race was real and was caught
        assert out == new and conn.reads["conflict"] == 1  # the leased path read the current value
        assert reader.get("other") == other and reader.get("k") == new


def test_index_resolves_only_the_clients_own_namespace(ems_servers):
    server = ems_servers("8M", extra=["--namespace", "tenant-a=4M:secret-a"])
    with EmsClient([server.addr], namespace="tenant-a", token="secret-a") as a, \
            EmsClient([server.addr], namespace="tenant-b") as b:
        a.put("name", b"a's value" * 100)
        ca, cb = a._conn(server.addr), b._conn(server.addr)
        assert ca.salt != cb.salt and ca.index.find(key_tag(ca.salt, b"name")) is not None
        assert cb.index.find(key_tag(cb.salt, b"name")) is None  # b's tag for the name points nowhere
        assert b.get("name") is None and cb.reads == {"lease": 1}  # asked the server: a miss
        b.put("name", b"b's value" * 100)
        assert a.get("name") == b"a's value" * 100 and b.get("name") == b"b's value" * 100
        assert ca.reads["index"] == 1 and cb.reads["index"] == 1


def test_keys_the_index_cannot_vouch_for_are_read_by_rpc(ems_servers):
    server = ems_servers("1M", ssd="8M")
    values = {f"k{i}": bytes([i]) * 200_000 for i in range(8)}  # 5 fit in DRAM: the rest spill
    with EmsClient([server.addr], namespace="fb") as client:
        client.mput(list(values.items()))
        conn = client._conn(server.addr)
        assert client.mget(list(values)) == list(values.values())
        assert conn.reads["lease"] >= 3 and conn.reads["index"] >= 3  # SSD hits come back by RPC
        conn.reads.clear()
        find, conn.index.find = conn.index.find, lambda tag: None  # e.g. a slot lost to a bucket neighbour
        assert client.get("k7") == values["k7"] and conn.reads == {"lease": 1}
        assert server_stats(server.addr)["leases"] == 1  # k7 stays pinned while it is copied ...
        conn.index.find = find
        assert client.get("k7") == values["k7"] and conn.reads == {"lease": 1, "index": 1}
        deadline = time.monotonic() + 2  # ... and is released by the next get, which needs no request
        while server_stats(server.addr)["leases"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server_stats(server.addr)["leases"] == 0


def test_restarted_server_is_never_read_through_the_old_index(ems_servers):
    server = ems_servers("8M")
    with EmsClient([server.addr], namespace="r", retry_after=0.2) as client:
        client.put("k", b"old" * 1000)
        conn = client._conn(server.addr)
        assert client.get("k") == b"old" * 1000 and conn.reads["index"] == 1
        conn._report_hits = lambda force=False: None  # its send would fail too: test the check itself
        server.restart()  # SIGKILL: the old segment stays mapped here, frozen with the old value
        with EmsClient([server.addr], namespace="r") as other:
            other.put("k", b"new" * 1000)
        assert client.get("k") is None  # the dead connection is noticed before the old index is read
        time.sleep(0.25)
        assert client.get("k") == b"new" * 1000
        assert client._conn(server.addr).reads["index"] == 1  # through the new server's index
