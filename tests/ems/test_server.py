"""Real server processes on loopback: round trips, LRU, SSD tier, namespaces and quotas."""

from __future__ import annotations

import os
import random
import socket
import time

import numpy as np
import pytest

from matrixinfer.ems.client import EmsClient, EmsPermissionError, EmsRefused, ErrorCode
from matrixinfer.ems.connection import server_stats

KB, MB = 1 << 10, 1 << 20


@pytest.mark.parametrize("fast_path", [True, False], ids=["shared-memory", "tcp"])
def test_round_trips_of_random_sizes_are_identical(ems_servers, fast_path):
    server = ems_servers("160M")
    rng = random.Random(7)
    sizes = [1, 2, 63, 64, 65] + [int(2 ** rng.uniform(0, 22)) for _ in range(12)]
    if fast_path:
        sizes.append(64 * MB)  # one value of the maximum size per path keeps the suite fast
    else:
        sizes.append(64 * MB - 3)
    with EmsClient([server.addr], namespace="rt", fast_path=fast_path) as client:
        assert (client._conn(server.addr).arena is not None) == fast_path
        for i, size in enumerate(sizes):
            value = np.frombuffer(os.urandom(size), np.uint8)
            assert client.put(f"k{i}", value)
            out = np.zeros(size + 5, np.uint8)  # a larger caller buffer: only the value is written
            assert client.get_into(f"k{i}", out) == size
            assert np.array_equal(out[:size], value) and not out[size:].any()
            if size <= 4 * MB:
                assert client.get(f"k{i}") == value.tobytes()
        client.release()  # same-host: the last read's pins are dropped now (no reply: poll)
        deadline = time.monotonic() + 2
        while server_stats(server.addr)["leases"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server_stats(server.addr)["leases"] == 0
        keys = [f"k{i}" for i in range(len(sizes) - 1)] + ["absent"]
        got = client.mget(keys)
        assert got[-1] is None and [len(g) for g in got[:-1]] == sizes[:-1]


@pytest.mark.parametrize("fast_path", [True, False], ids=["shared-memory", "tcp"])
def test_eviction_order_is_lru(ems_servers, fast_path):
    server = ems_servers("1M")  # holds exactly five 200,000-byte values
    value = b"v" * 200_000
    with EmsClient([server.addr], namespace="lru", fast_path=fast_path) as client:
        for i in range(5):
            client.put(f"k{i}", value)
        assert client.get("k0") == value  # k0 becomes most recently used; k1 is now the oldest
        assert client._conn(server.addr).reads["index"] == fast_path  # same host: no request at all
        client.put("k5", value)
        client.put("k6", value)
        assert client.mexists([f"k{i}" for i in range(7)]) == [True, False, False, True, True, True, True]
        st = server_stats(server.addr)["namespaces"]["lru"]
        assert st["evictions"] == 2 and st["dram_bytes"] <= MB


def test_ssd_spill_and_promotion(ems_servers):
    server = ems_servers("1M", ssd="8M")
    values = {f"k{i}": os.urandom(200_000) for i in range(12)}
    with EmsClient([server.addr], namespace="tier") as client:
        for k, v in values.items():
            assert client.put(k, v)
        before = server_stats(server.addr)["namespaces"]["tier"]
        assert before["spills"] >= 7 and before["ssd_entries"] >= 7
        for k, v in values.items():  # evicted values come back from SSD, identical
            assert client.get(k) == v
        st = server_stats(server.addr)["namespaces"]["tier"]
        assert st["ssd_hits"] >= 7 and st["promotions"] >= 7 and st["misses"] == 0
        assert client.exists("k0") and client.delete("k0") and not client.exists("k0")


def test_namespace_isolation(ems_servers):
    server = ems_servers("8M", extra=["--namespace", "tenant-a=4M:secret-a"])
    with EmsClient([server.addr], namespace="tenant-a", token="secret-a") as a, \
            EmsClient([server.addr], namespace="tenant-b") as b:
        assert a.put("shared-name", b"a's value")
        assert b.get("shared-name") is None  # b cannot read a's key
        assert not b.exists("shared-name")
        assert not b.delete("shared-name")  # nor delete it
        b.put("shared-name", b"b's value")
        assert a.get("shared-name") == b"a's value"
        assert b.get("shared-name") == b"b's value"
    with EmsClient([server.addr], namespace="tenant-a", token="guess") as intruder:
        with pytest.raises(EmsPermissionError, match="tenant-a.*wrong or missing token"):
            intruder.get("shared-name")
    closed = ems_servers("4M", extra=["--closed", "--namespace", "only=1M"])
    with EmsClient([closed.addr], namespace="other") as other:
        with pytest.raises(EmsPermissionError, match="not declared"):
            other.put("k", b"v")


def test_quotas_are_enforced(ems_servers):
    server = ems_servers("8M", extra=["--namespace", "small=1M", "--namespace", "big=6M"])
    with EmsClient([server.addr], namespace="small") as small, EmsClient([server.addr], namespace="big") as big:
        for i in range(5):
            big.put(f"b{i}", b"x" * 1_000_000)
        for i in range(8):
            small.put(f"s{i}", b"y" * 200_000)
        st = server_stats(server.addr)["namespaces"]
        assert st["small"]["dram_bytes"] <= MB < 8 * 200_000
        assert st["big"]["dram_entries"] == 5  # small's churn evicted only its own entries
        with pytest.raises(EmsRefused, match="quota") as err:
            small.put("too-big", b"z" * (2 * MB))
        assert err.value.code == ErrorCode.QUOTA
        assert small.mput([("too-big", b"z" * (2 * MB))], strict=False) == [False]


@pytest.mark.parametrize("fast_path", [True, False], ids=["shared-memory", "tcp"])
def test_small_buffer_is_refused_and_connection_stays_usable(ems_servers, fast_path):
    server = ems_servers("8M")
    with EmsClient([server.addr], namespace="buf", fast_path=fast_path) as client:
        client.mput([("a", b"x" * 1000), ("b", b"y" * 10)])
        with pytest.raises(ValueError, match="holds 100 bytes, value has 1000"):
            client.mget(["a", "b"], [bytearray(100), bytearray(10)])
        assert client.get("b") == b"y" * 10 and client.get("a") == b"x" * 1000
        with pytest.raises(EmsRefused, match="key_too_long") as err:
            client.put(b"k" * 5000, b"v")
        assert err.value.code == ErrorCode.KEY_TOO_LONG
        assert client.get("b") == b"y" * 10


def test_same_host_clients_talk_over_the_local_socket(ems_servers):
    server = ems_servers("8M")
    with EmsClient([server.addr], namespace="l") as local, \
            EmsClient([server.addr], namespace="l", fast_path=False) as tcp:
        assert local.put("k", b"v") and tcp.get("k") == b"v"
        conn = local._conn(server.addr)
        assert conn.sock.family == socket.AF_UNIX and tcp._conn(server.addr).sock.family == socket.AF_INET
        assert conn._move_to_local("\0matrixinfer-ems-absent", "l", "", 1.0, 0.5) is None  # unreachable: stay
        assert conn.sock.family == socket.AF_UNIX and local.exists("k")
