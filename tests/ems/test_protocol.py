"""The EMS wire and its settings: every refusal a peer sees is an ErrorCode, flags come from
EmsServerConfig, and the socket-buffer setting is read through envs."""

from __future__ import annotations

import argparse
import socket
import threading

import pytest

from matrixinfer import netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.config import EmsServerConfig, NamespaceConfig, add_server_args, server_config
from matrixinfer.ems.controller import Controller
from matrixinfer.ems.membership import ControllerMembership
from matrixinfer.ems.protocol import ErrorCode
from matrixinfer.ems.server import EmsServer, run_server
from matrixinfer.ems.service import EmsService
from matrixinfer.ems.store import ArenaFull, EmsStoreError, QuotaExceeded, ValueTooLarge


@pytest.fixture
def server():
    """An in-process server without shared memory (TCP only)."""
    srv = EmsServer(EmsService(1 << 20, namespaces={"small": NamespaceConfig(4096)}, shared=False))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.stop()


def _call(sock: socket.socket, req: p.Request, payloads: list[bytes] | None = None) -> p.Reply:
    p.send_frame(sock, req, payloads or [])
    return p.recv_reply(sock)


def test_refusals_on_the_wire_are_error_codes(server):
    with netio.connect(server.address, timeout=5) as sock:
        reply = _call(sock, p.Get(keys=[b"k"]))
        assert reply.code is ErrorCode.NO_SESSION and reply.code == "no_session"
        assert _call(sock, p.Hello(namespace="small")).code is ErrorCode.OK
        keys = [b"a", b"b" * (p.MAX_KEY + 1), b"c"]
        reply = _call(sock, p.Put(keys=keys, sizes=[3, 1, 8192]), [b"abc", b"x", bytes(8192)])
        assert reply.codes == [ErrorCode.OK, ErrorCode.KEY_TOO_LONG, ErrorCode.QUOTA]
        assert _call(sock, p.Reserve(keys=[b"a"], sizes=[])).code is ErrorCode.BAD_REQUEST
        assert _call(sock, p.Members()).code is ErrorCode.UNSUPPORTED
        reply = _call(sock, p.Get(keys=[b"a", b"c"]))
        assert reply.sizes == [3, p.MISS] and not reply.code
        out = bytearray(3)
        netio.recv_exact_into(sock, memoryview(out))
        assert out == b"abc"


def test_store_refusals_carry_their_code():
    assert [e.code for e in (EmsStoreError, QuotaExceeded, ValueTooLarge, ArenaFull)] == \
        [ErrorCode.ERROR, ErrorCode.QUOTA, ErrorCode.TOO_LARGE, ErrorCode.FULL]


def test_controller_refusals_are_error_codes():
    ctl = Controller().start()
    try:
        view = ControllerMembership(ctl.address)
        lease = view.register("127.0.0.1:1", 30.0)
        assert view.keepalive(lease) and not view.keepalive(lease + 100)
        assert view.members() == ["127.0.0.1:1"]
        with netio.connect(ctl.address, timeout=5) as sock:
            assert _call(sock, p.KeepAlive(lease=lease + 100)).code is ErrorCode.UNKNOWN_LEASE
            assert _call(sock, p.Stats()).code is ErrorCode.UNSUPPORTED
    finally:
        ctl.stop()


def test_an_ems_client_talking_to_another_protocol_gets_a_wire_error():
    with netio.listen("", 0) as srv:
        addr = netio.format_addr("127.0.0.1", srv.getsockname()[1])

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                p.recv_request(conn)
                conn.sendall(netio.FRAMING.encode(["MatrixInfer router frame"]))

        threading.Thread(target=answer, daemon=True).start()
        with netio.connect(addr, timeout=5) as sock:
            p.send_frame(sock, p.Stats())
            with pytest.raises(netio.WireError, match=r"EMS server: bad frame magic b'MIF1', expected b'EMS1'"):
                p.recv_reply(sock)


def _parse(argv: list[str]) -> EmsServerConfig:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return server_config(parser.parse_args(argv))


def test_server_flags_are_generated_from_the_config():
    assert _parse(["--capacity", "4M"]) == EmsServerConfig(capacity=4 << 20)
    cfg = _parse(["--capacity", "1G", "--ssd-dir", "/tmp/x", "--ssd-capacity", "2g", "--listen", ":7000",
                  "--advertise", "10.0.0.1:7000", "--namespace", "a=1M:tok", "--namespace", "b=512K", "--closed",
                  "--default-quota", "64M", "--controller", "127.0.0.1:7100", "--cluster", "c", "--lease-ttl", "1.5"])
    assert cfg == EmsServerConfig(capacity=1 << 30, ssd_dir="/tmp/x", ssd_capacity=2 << 30, listen=":7000",
                                  advertise="10.0.0.1:7000",
                                  namespaces={"a": NamespaceConfig(1 << 20, "tok"), "b": NamespaceConfig(512 << 10)},
                                  closed=True, default_quota=64 << 20, controller="127.0.0.1:7100", cluster="c",
                                  lease_ttl=1.5)
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    help_text = " ".join(parser.format_help().split())
    assert "refuse namespaces that were not declared" in help_text and "membership lease in seconds" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --capacity is required
    with pytest.raises(SystemExit):
        parser.parse_args(["--capacity", "lots"])


def test_a_bad_listen_address_is_refused_before_the_arena_exists():
    with pytest.raises(ValueError, match="address 'localhost' is not HOST:PORT"):
        run_server(EmsServerConfig(capacity=1 << 20, listen="localhost"))


def test_socket_buffer_comes_from_envs(monkeypatch):
    a, b = socket.socketpair()
    with a, b:
        monkeypatch.delenv("MATRIXINFER_EMS_SOCKET_BUFFER", raising=False)
        p.tune_socket(a)
        default = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        monkeypatch.setenv("MATRIXINFER_EMS_SOCKET_BUFFER", "16384")
        p.tune_socket(b)
        assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 16384 < default  # Linux doubles it
