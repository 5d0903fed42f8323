"""EMS with a deployment secret (issue 19, high 4): servers and the controller serve only clients that
prove the secret (on TCP and on the same-host unix socket); the controller caps connections, request
sizes, idle time and leases, and refuses unsound registrations."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from matrixinfer import auth, netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.client import EmsClient, EmsPermissionError
from matrixinfer.ems.connection import ServerConnection, server_stats
from matrixinfer.ems.controller import Controller
from matrixinfer.ems.membership import ControllerMembership
from matrixinfer.ems.protocol import ErrorCode

SECRET = b"e" * 32


@pytest.fixture
def secret_file(tmp_path):
    return auth.write_secret_file(SECRET, str(tmp_path))


def test_a_server_with_a_secret_serves_only_clients_that_prove_it(ems_servers, secret_file):
    server = ems_servers("16M", extra=["--secret-file", str(secret_file)])
    with pytest.raises(EmsPermissionError, match="requires the deployment secret"):
        ServerConnection(server.addr, "matrixinfer")
    with pytest.raises(auth.AuthError):
        ServerConnection(server.addr, "matrixinfer", secret=b"w" * 32)
    anonymous = EmsClient([server.addr], namespace="matrixinfer")
    with pytest.raises(EmsPermissionError):
        anonymous.put(b"prompt-hash", b"poison")  # no cache poisoning without the secret
    raw = netio.connect(server.addr, timeout=5)  # a plain protocol client: refused, then closed
    p.send_frame(raw, p.Hello(namespace="matrixinfer"))
    assert p.recv_reply(raw).code == ErrorCode.REFUSED
    p.send_frame(raw, p.Put(keys=[b"prompt-hash"], sizes=[6]), [b"poison"])
    with pytest.raises(OSError):
        p.recv_reply(raw)
    raw.close()

    client = EmsClient([server.addr], namespace="matrixinfer", secret=SECRET)
    assert client.put(b"k", b"v" * 100_000)  # over FAST_PUT_MIN: the same-host reserve/commit path
    assert client.get(b"k") == b"v" * 100_000
    conn = client._conn(server.addr)
    assert conn is not None and conn.arena is not None  # the unix socket authenticated too
    with pytest.raises(EmsPermissionError):
        anonymous.get(b"k")
    assert server_stats(server.addr, "matrixinfer", secret=SECRET)["namespaces"]["matrixinfer"]["dram_entries"] == 1
    with pytest.raises(EmsPermissionError):
        server_stats(server.addr, "matrixinfer")


def test_a_client_that_never_authenticates_is_dropped(ems_servers, secret_file):
    server = ems_servers("8M", extra=["--secret-file", str(secret_file), "--idle-timeout", "1"])
    sock = netio.connect(server.addr, timeout=10)
    t0 = time.monotonic()
    assert sock.recv(1) == b""  # closed after the handshake timeout (here the idle timeout), not held forever
    assert time.monotonic() - t0 < 4
    sock.close()


def _raw_call(addr: str, req: p.Request, secret: bytes = SECRET) -> p.Reply:
    with netio.connect(addr, timeout=5) as sock:
        auth.client_handshake(sock, secret, "ems-controller")
        p.send_frame(sock, req)
        return p.recv_reply(sock)


def test_the_controller_requires_the_secret_and_caps_what_it_holds():
    ctl = Controller(secret=SECRET, max_connections=3, idle_timeout=1.0, max_leases=2).start()
    try:
        with pytest.raises(ConnectionRefusedError, match="requires the deployment secret"):
            ControllerMembership(ctl.address).register("127.0.0.1:7000", 3.0)  # a fake server cannot join
        with pytest.raises(auth.AuthError):
            ControllerMembership(ctl.address, secret=b"w" * 32).members()
        view = ControllerMembership(ctl.address, secret=SECRET)
        view.register("127.0.0.1:7000", 3.0)
        view.register("127.0.0.1:7001", 3.0)
        assert view.members() == ["127.0.0.1:7000", "127.0.0.1:7001"]
        assert _raw_call(ctl.address, p.Register(addr="127.0.0.1:7002", ttl=3.0)).code == ErrorCode.FULL
        for bad in (p.Register(addr="h" * 280 + ":7003", ttl=3.0), p.Register(addr="127.0.0.1:7003", ttl=1e12),
                    p.Register(addr="nowhere", ttl=3.0), p.Register(addr="127.0.0.1:7003", ttl=float("nan"))):
            assert _raw_call(ctl.address, bad).code == ErrorCode.BAD_REQUEST
        with pytest.raises(OSError):  # a request over the controller's 4 KiB frames: the connection closes
            _raw_call(ctl.address, p.Register(addr="x" * 5000, ttl=3.0))
        assert view.members() == ["127.0.0.1:7000", "127.0.0.1:7001"]

        big = netio.connect(ctl.address, timeout=5)  # a header announcing 1 GiB: closed, nothing allocated
        auth.client_handshake(big, SECRET, "ems-controller")
        big.sendall(struct.pack("<4sI", b"EMS1", 1 << 30))
        assert big.recv(1) == b""
        big.close()

        idle = [netio.connect(ctl.address, timeout=5) for _ in range(3)]
        time.sleep(0.2)
        extra = netio.connect(ctl.address, timeout=5)
        assert extra.recv(1) == b""  # over the connection cap: closed at once
        t0 = time.monotonic()
        assert all(s.recv(1) == b"" for s in idle)  # idle ones close after idle_timeout
        assert time.monotonic() - t0 < 5
        for s in (*idle, extra):
            s.close()
        assert view.members() == ["127.0.0.1:7000", "127.0.0.1:7001"]  # and it still serves
    finally:
        ctl.stop()


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_garbage_on_the_controller_port_costs_only_that_connection():
    ctl = Controller(secret=SECRET).start()
    try:
        for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", b"MIA1" + b"\xff" * 64):
            with socket.create_connection(netio.parse_addr(ctl.address), timeout=15) as s:
                s.sendall(junk)
                assert _closed_by_peer(s)  # after at most a challenge: a bad proof is not answered
        view = ControllerMembership(ctl.address, secret=SECRET)
        view.register("127.0.0.1:7000", 3.0)
        assert view.members() == ["127.0.0.1:7000"]
    finally:
        ctl.stop()


def test_a_namespace_token_can_come_from_a_file_and_stays_off_the_command_line(ems_servers, tmp_path):
    token_file = tmp_path / "vault.token"
    token_file.write_text("vault-token-0123456789\n")
    server = ems_servers("8M", extra=["--namespace", f"vault=4M:@{token_file}", "--closed"])
    with open(f"/proc/{server.proc.pid}/cmdline", "rb") as f:
        assert b"vault-token" not in f.read()
    with pytest.raises(EmsPermissionError):
        ServerConnection(server.addr, "vault", token="guess")
    client = EmsClient([server.addr], namespace="vault", token="vault-token-0123456789")
    assert client.put(b"k", b"v") and client.get(b"k") == b"v"
