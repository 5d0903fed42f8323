"""Pure parts: the hash ring, the SSD tier's recovery and checks, the controller's lease table."""

from __future__ import annotations

import os

from matrixinfer.ems.controller import LeaseTable
from matrixinfer.ems.ring import HashRing, moved_fraction
from matrixinfer.ems.ssd import SsdTier

KEYS = [f"key-{i}".encode() for i in range(20000)]


def test_adding_a_fourth_server_moves_about_a_quarter_of_keys():
    three = HashRing(["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"])
    four = HashRing(three.nodes + ["10.0.0.4:7000"])
    frac = moved_fraction(three, four, KEYS)
    assert 0.15 < frac <= 0.35
    # every moved key moved to the new server, none between old ones
    assert all(four.primary(k) == "10.0.0.4:7000" for k in KEYS[:2000] if three.primary(k) != four.primary(k))


def test_replicas_are_distinct_servers():
    ring = HashRing(["a:1", "b:1", "c:1"])
    for k in KEYS[:500]:
        owners = ring.owners(k, 2)
        assert len(set(owners)) == 2 and owners[0] == ring.primary(k)
    assert HashRing([]).owners(b"k") == []


def test_ssd_tier_recovers_and_rejects_torn_files(tmp_path):
    tier = SsdTier(str(tmp_path), 1 << 20)
    vals = {bytes([i]): os.urandom(1000 + i) for i in range(5)}
    for k, v in vals.items():
        assert tier.put("ns", k, memoryview(v))
    # a torn write: right length, wrong bytes; a truncated file; a leftover temp file
    torn, short = tier.index[("ns", b"\x01")].path, tier.index[("ns", b"\x02")].path
    with open(torn, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\0" * 10)
    with open(short, "r+b") as f:
        f.truncate(os.path.getsize(short) - 1)
    (tmp_path / "junk.ems.tmp").write_bytes(b"partial")

    again = SsdTier(str(tmp_path), 1 << 20)
    assert again.dropped_on_recovery == 1  # the truncated file is caught by its length
    assert not (tmp_path / "junk.ems.tmp").exists()
    for k, v in vals.items():
        out = bytearray(len(v))
        ok = again.read_into("ns", k, memoryview(out))
        assert ok == (k not in (b"\x01", b"\x02"))
        if ok:
            assert out == v
    assert again.corrupt_reads == 1 and not os.path.exists(torn)


def test_ssd_tier_lru_and_capacity(tmp_path):
    tier = SsdTier(str(tmp_path), 3500)
    for i in range(3):
        tier.put("ns", bytes([i]), memoryview(b"x" * 1000))
    tier.read_into("ns", b"\x00", memoryview(bytearray(1000)))  # 0 is now most recent
    tier.put("ns", b"\x03", memoryview(b"y" * 1000))
    assert [k for _, k in tier.index] == [b"\x02", b"\x00", b"\x03"]
    assert tier.used <= 3500


def test_lease_table_expires_members():
    table = LeaseTable()
    a = table.register("a:1", ttl=2.0, now=0.0)
    table.register("b:1", ttl=2.0, now=0.0)
    assert table.keepalive(a, now=1.5)
    assert table.members(now=3.0) == ["a:1"]  # b missed its heartbeat
    assert not table.keepalive(a, now=10.0)
    assert table.members(now=10.0) == []
