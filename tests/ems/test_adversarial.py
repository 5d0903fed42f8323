"""Clients that do not follow the SDK (issue 19): the server validates every size, never serves bytes a
namespace did not write, bounds what an announced length may cost, answers only sessions, keeps
undeclared namespaces from evicting declared ones, and closes idle, stalled and surplus connections.

Raw protocol clients talk to real server processes (``ems_servers``) or to an in-process service.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from matrixinfer import netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.client import EmsClient, EmsPermissionError
from matrixinfer.ems.config import NamespaceConfig
from matrixinfer.ems.connection import server_stats
from matrixinfer.ems.protocol import ErrorCode
from matrixinfer.ems.service import EmsService, Session
from tests.helpers import python_env

KB, MB = 1 << 10, 1 << 20


class Raw:
    """A hand-driven protocol connection (no SDK)."""

    def __init__(self, addr: str, namespace: str | None = None, token: str = "") -> None:
        self.sock = netio.connect(addr, timeout=5)
        if namespace is not None:
            reply = self.call(p.Hello(namespace=namespace, token=token))
            assert not reply.code, reply.error

    def call(self, req: p.Request, payloads: list[bytes] | None = None) -> p.Reply:
        p.send_frame(self.sock, req, payloads or [])
        return p.recv_reply(self.sock)

    def get(self, key: bytes) -> bytes | None:
        reply = self.call(p.Get(keys=[key]))
        size = reply.sizes[0]
        if size == p.MISS:
            return None
        buf = bytearray(size)
        netio.recv_exact_into(self.sock, memoryview(buf))
        return bytes(buf)

    def closed(self, within: float) -> bool:
        """Whether the server closes this connection within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


# -- sizes and offsets -------------------------------------------------------------------------------
def test_a_negative_reserve_size_is_refused(ems_servers):
    server = ems_servers("8M", extra=["--namespace", "vault=4M:s3cret"])
    vault = Raw(server.addr, "vault", "s3cret")
    assert vault.call(p.Put(keys=[b"k"], sizes=[1000]), [b"V" * 1000]).codes == [ErrorCode.OK]
    attacker = Raw(server.addr, "anon")
    reply = attacker.call(p.Reserve(keys=[b"a", b"b"], sizes=[-(256 * MB), 100]))
    assert reply.codes == [ErrorCode.BAD_REQUEST, ErrorCode.OK] and reply.offsets[0] == -1
    attacker.call(p.Commit(reservation=reply.lease))
    assert attacker.get(b"a") is None
    assert attacker.get(b"b") == bytes(100)
    assert vault.get(b"k") == b"V" * 1000


def test_commit_of_an_unwritten_reservation_never_serves_another_namespaces_bytes(ems_servers):
    server = ems_servers("8M", extra=["--namespace", "vault=4M:s3cret"])
    vault = Raw(server.addr, "vault", "s3cret")
    secret = b"TOP-SECRET-" * 10_000
    assert vault.call(p.Put(keys=[b"k"], sizes=[len(secret)]), [secret]).codes == [ErrorCode.OK]
    vault.call(p.Delete(keys=[b"k"]))  # its block is free again, bytes still in place
    attacker = Raw(server.addr, "anon")
    reply = attacker.call(p.Reserve(keys=[b"x"], sizes=[len(secret)]))
    assert reply.codes == [ErrorCode.OK]
    attacker.call(p.Commit(reservation=reply.lease))  # nothing was written into the block
    got = attacker.get(b"x")
    assert got is not None and len(got) == len(secret)
    assert got == bytes(len(secret))


def test_an_announced_header_costs_only_what_arrives(ems_servers):
    """A prefix that announces a 60 MiB header and sends nothing must not make the server allocate it."""
    server = ems_servers("8M")
    pid = server.proc.pid

    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * KB for line in f if line.startswith("VmRSS"))

    before = rss()
    socks = []
    for _ in range(4):
        s = netio.connect(server.addr, timeout=5)
        s.sendall(struct.pack("<4sI", b"EMS1", 60 * MB))
        socks.append(s)
    time.sleep(0.5)
    grown = rss() - before
    for s in socks:
        s.close()
    assert grown < 32 * MB, f"server grew by {grown / MB:.0f} MiB for 4 empty announced headers"


# -- sessions, quotas -----------------------------------------------------------------------------------
def test_stats_need_a_session_and_hide_protected_namespaces(ems_servers):
    server = ems_servers("8M", extra=["--namespace", "vault=2M:s3cret"])
    raw = Raw(server.addr)
    assert raw.call(p.Stats()).code == ErrorCode.NO_SESSION
    vault = Raw(server.addr, "vault", "s3cret")
    vault.call(p.Put(keys=[b"k"], sizes=[10]), [b"x" * 10])
    Raw(server.addr, "open-ns").call(p.Put(keys=[b"k"], sizes=[10]), [b"y" * 10])
    assert set(server_stats(server.addr, "vault", "s3cret")["namespaces"]) == {"vault", "open-ns"}
    assert set(server_stats(server.addr, "someone")["namespaces"]) == {"open-ns"}
    with pytest.raises(EmsPermissionError, match="token"):
        server_stats(server.addr, "vault", "wrong")


def test_undeclared_namespaces_never_evict_declared_ones():
    svc = EmsService(1 * MB, namespaces={"vip": NamespaceConfig(512 * KB)}, default_quota=1 * MB, shared=False)
    vip, anon = Session(), Session()
    svc.open(vip, "vip", "")
    svc.open(anon, "anon", "")
    for i in range(4):
        svc.commit(vip, f"v{i}".encode(), svc.reserve(vip, 100 * KB), 100 * KB)
    stored = 0
    for i in range(20):  # far more than the 600 KB the vip namespace leaves free
        try:
            svc.commit(anon, f"a{i}".encode(), svc.reserve(anon, 100 * KB), 100 * KB)
            stored += 1
        except Exception:  # noqa: BLE001 - full: anon evicts only its own entries
            pass
    assert stored == 20  # anon's puts went on by evicting anon's own entries
    assert svc.store.used_by("vip") == (4 * 100 * KB, 4)
    assert svc.default_quota == 1 * MB
    assert EmsService(1 * MB, namespaces={"vip": NamespaceConfig(256 * KB)}, shared=False).default_quota == 768 * KB


def test_namespace_names_and_counts_are_bounded():
    svc = EmsService(1 * MB, shared=False)
    with pytest.raises(Exception, match="1 to 256 bytes"):
        svc.open(Session(), "n" * 300, "")
    with pytest.raises(Exception, match="1 to 256 bytes"):
        svc.open(Session(), "", "")


# -- connections ------------------------------------------------------------------------------------------
def test_idle_and_stalled_connections_are_closed(ems_servers):
    server = ems_servers("8M", extra=["--idle-timeout", "0.5"])
    silent = Raw(server.addr)
    stalled = Raw(server.addr)
    stalled.sock.sendall(struct.pack("<4sI", b"EMS1", 100) + b"\x81" * 10)  # 10 of 100 header bytes
    assert silent.closed(within=3) and stalled.closed(within=3)
    with EmsClient([server.addr], namespace="c") as client:  # the SDK reconnects after an idle close
        assert client.put("k", b"v" * 100)
        time.sleep(1.2)
        assert client.get("k") == b"v" * 100


def test_connections_beyond_the_cap_are_closed(ems_servers):
    server = ems_servers("8M", extra=["--max-connections", "2"])
    a, b = Raw(server.addr, "a"), Raw(server.addr, "b")
    c = Raw(server.addr)
    assert c.closed(within=3)
    a.close()
    deadline = time.monotonic() + 3
    while True:  # the slot frees once the server has seen a's close
        d = Raw(server.addr)
        try:
            reply = d.call(p.Hello(namespace="d"))
            break
        except (OSError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not reply.code
    assert b.call(p.Exists(keys=[b"k"])).found == [False]


def test_a_put_with_a_negative_size_closes_only_that_connection(ems_servers):
    server = ems_servers("8M")
    bad = Raw(server.addr, "x")
    p.send_frame(bad.sock, p.Put(keys=[b"k"], sizes=[-5]))
    assert bad.closed(within=3)
    good = Raw(server.addr, "x")
    assert good.call(p.Put(keys=[b"k"], sizes=[3]), [b"abc"]).codes == [ErrorCode.OK]
    assert good.get(b"k") == b"abc"


def test_raw_socket_survives_garbage(ems_servers):
    server = ems_servers("8M")
    s = socket.create_connection(netio.parse_addr(server.addr), timeout=3)
    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    s.close()
    assert Raw(server.addr, "ok").call(p.Exists(keys=[b"k"])).found == [False]


# -- the shared segment -----------------------------------------------------------------------------------
def test_a_killed_server_leaves_no_shared_memory_segment(ems_servers):
    server = ems_servers("8M")
    pid = server.proc.pid

    def segments() -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"matrixinfer-ems-{pid}-")]

    with EmsClient([server.addr], namespace="m") as client:
        assert client.put("k", b"v" * 100_000) and client._conn(server.addr).arena is not None
        assert client.get("k") == b"v" * 100_000  # the same-host fast path works without a named segment
    assert segments() == []
    server.kill()
    assert segments() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_a_client_of_another_user_gets_no_arena_but_is_served(ems_servers):
    server = ems_servers("8M")
    code = f"""
import encodings.idna, os, socket  # modules a user without access to this Python cannot load later
from matrixinfer.ems.client import EmsClient
os.setgid(65534)
os.setuid(65534)
with EmsClient([{server.addr!r}], namespace="other") as client:
    assert client.put("k", b"x" * 200_000) and client.get("k") == b"x" * 200_000
    conn = client._conn({server.addr!r})
    print(conn.arena is None, conn.sock.family == socket.AF_UNIX)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
