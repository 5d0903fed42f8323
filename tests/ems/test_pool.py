"""Several server processes: failures, restarts, growth, membership, async forms and the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.controller import Controller
from matrixinfer.ems.membership import ControllerMembership
from matrixinfer.ems.ring import HashRing
from tests.helpers import REPO, python_env, spawn

VALUES = {f"key-{i}": os.urandom(64 + i) for i in range(300)}


def test_killing_one_of_three_servers_turns_its_keys_into_misses(ems_servers):
    servers = [ems_servers("16M") for _ in range(3)]
    addrs = [s.addr for s in servers]
    with EmsClient(addrs, namespace="ha", fast_path=False) as client:
        assert all(client.mput(list(VALUES.items())))
        servers[1].kill()
        t0 = time.monotonic()
        got = client.mget(list(VALUES))
        assert time.monotonic() - t0 < 2.0  # a dead server costs one refused connect, not a timeout
        for (k, v), g in zip(VALUES.items(), got):
            if client.ring.primary(k.encode()) == addrs[1]:
                assert g is None
            else:
                assert g == v
        assert any(g is None for g in got) and sum(g is not None for g in got) > 150
        dead_key = next(k for k in VALUES if client.ring.primary(k.encode()) == addrs[1])
        assert client.put(dead_key, b"x") is False and client.get(dead_key) is None


def test_replication_survives_one_dead_server(ems_servers):
    servers = [ems_servers("16M") for _ in range(3)]
    with EmsClient([s.addr for s in servers], namespace="rep", replicas=2) as client:
        client.mput(list(VALUES.items())[:100])
        servers[0].kill()
        assert client.mget(list(VALUES)[:100]) == list(VALUES.values())[:100]


def test_restart_never_serves_stale_or_torn_values(ems_servers, tmp_path):
    server = ems_servers("1M", ssd="16M")
    old = {f"k{i}": os.urandom(150_000) for i in range(20)}
    with EmsClient([server.addr], namespace="crash") as client:
        client.mput(list(old.items()))  # most are spilled to SSD
        new = {"k0": os.urandom(150_000), "k1": b"short new value"}
        client.mput(list(new.items()))  # overwrites: the spilled old copies must never come back
    ssd_dir = tmp_path / "ssd0"
    files = sorted(ssd_dir.glob("*.ems"))
    assert len(files) >= 10
    with open(files[-1], "r+b") as f:  # tear one file: right length, wrong tail
        f.seek(-100, os.SEEK_END)
        f.write(b"\xff" * 100)
    server.restart()  # SIGKILL, then the same port and SSD directory
    with EmsClient([server.addr], namespace="crash") as client:
        got = client.mget(list(old))
        served = 0
        for (k, v), g in zip(old.items(), got):
            if g is not None:
                assert g == new.get(k, v), f"{k} returned a stale or torn value"
                served += 1
        assert got[0] is None and got[1] is None  # the new values died with DRAM; the old never return
        assert served >= 8  # the SSD tier survived the restart


def test_adding_a_fourth_server_moves_at_most_35_percent(ems_servers):
    servers = [ems_servers("16M") for _ in range(4)]
    three, four = [s.addr for s in servers[:3]], [s.addr for s in servers]
    with EmsClient(three, namespace="grow") as c3, EmsClient(four, namespace="grow") as c4:
        c3.mput(list(VALUES.items()))
        got = c4.mget(list(VALUES))
        misses = sum(g is None for g in got)
        assert all(g == v for g, v in zip(got, VALUES.values()) if g is not None)
        assert misses / len(VALUES) <= 0.35
        assert misses == sum(HashRing(three).primary(k.encode()) != HashRing(four).primary(k.encode())
                             for k in VALUES)


def test_dead_server_leaves_the_controller_ring_after_its_lease(ems_servers):
    ctl = Controller().start()
    try:
        extra = ["--controller", ctl.address, "--lease-ttl", "1"]
        servers = [ems_servers("16M", extra=extra) for _ in range(3)]
        client = EmsClient(membership=ControllerMembership(ctl.address), namespace="m", refresh_s=0.2)
        deadline = time.monotonic() + 5
        while len(client.ring.nodes) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            client.refresh()
        assert sorted(client.ring.nodes) == sorted(s.addr for s in servers)
        client.mput(list(VALUES.items()))
        servers[2].kill()
        deadline = time.monotonic() + 5
        while servers[2].addr in client.ring.nodes and time.monotonic() < deadline:
            assert None not in client.mexists(list(VALUES)[:5])  # ops keep working meanwhile
            time.sleep(0.1)
            client.refresh()
        assert sorted(client.ring.nodes) == sorted(s.addr for s in servers[:2])
        got = client.mget(list(VALUES))
        assert all(g is None or g == v for g, v in zip(got, VALUES.values()))
        assert client.mput(list(VALUES.items())) == [True] * len(VALUES)  # remapped keys are writable
        client.close()
    finally:
        ctl.stop()


def test_async_forms(ems_servers):
    server = ems_servers("16M")

    async def main(client: EmsClient) -> list:
        await asyncio.gather(*(client.aput(f"a{i}", bytes([i]) * 1000) for i in range(20)))
        out = bytearray(1000)
        n = await client.aget_into("a3", out)
        return [n, bytes(out), await client.aget("a4"), await client.amget(["a5", "zz"])]

    with EmsClient([server.addr], namespace="async") as client:
        n, out, v4, many = asyncio.run(main(client))
        assert n == 1000 and out == bytes([3]) * 1000 and v4 == bytes([4]) * 1000
        assert many == [bytes([5]) * 1000, None]


def test_cli_server_and_stats(tmp_path):
    proc, addr = spawn(["ems-server", "--capacity", "4M", "--namespace", "cli=2M"], module="matrixinfer.cli")
    try:
        with EmsClient([addr], namespace="cli") as client:
            client.put("k", b"v")
            client.get("k")
            client.get("missing")
        out = subprocess.run([sys.executable, "-m", "matrixinfer.cli", "ems", "stats", "--servers", addr],
                             capture_output=True, text=True, env=python_env(), cwd=REPO, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "cli" in out.stdout and "50.0%" in out.stdout and "hit rate" in out.stdout
    finally:
        proc.kill()
        proc.wait()


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is in the stopped state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(st in ("T", "t") for st in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def test_hung_server_turns_into_misses_after_the_timeout(ems_servers):
    server = ems_servers("8M")
    with EmsClient([server.addr], namespace="hang", timeout=0.5, fast_path=False) as client:
        client.put("k", b"v")
        server.proc.send_signal(signal.SIGSTOP)  # alive but not answering
        try:
            _wait_stopped(server.proc.pid)  # the stop is asynchronous: do not race it
            t0 = time.monotonic()
            assert client.get("k") is None
            assert client.get("k") is None  # now skipped without waiting (retry_after)
            assert time.monotonic() - t0 < 1.5
        finally:
            server.proc.send_signal(signal.SIGCONT)
