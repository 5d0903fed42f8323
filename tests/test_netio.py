"""matrixinfer.netio: addresses, frames with payloads, and the errors a wrong or vanishing peer causes.

(Lives under tests/ems until tests/ mirrors netio.py at the top level: EMS is its heaviest user.)
"""

from __future__ import annotations

import asyncio
import socket
import threading

import msgspec
import pytest

from matrixinfer import netio


class Ping(msgspec.Struct, tag=True):
    seq: int
    nbytes: int = 0


DECODER = msgspec.msgpack.Decoder(Ping)


@pytest.mark.parametrize("addr, expected", [
    ("10.0.0.1:7000", ("10.0.0.1", 7000)),
    ("localhost:0", ("localhost", 0)),
    (":7000", ("127.0.0.1", 7000)),  # an empty host is loopback, never all interfaces
    ("[::1]:7000", ("::1", 7000)),
    ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
])
def test_parse_addr_accepts_host_port_and_bracketed_ipv6(addr, expected):
    assert netio.parse_addr(addr) == expected
    host, port = expected
    assert netio.parse_addr(netio.format_addr(host, port)) == expected


@pytest.mark.parametrize("addr", ["10.0.0.1", "10.0.0.1:", "host:http", "host:70000", "::1:7000", "[]:7000",
                                  "[::1:7000", "host:-1", "host:\u00b2"])
def test_parse_addr_names_the_bad_address(addr):
    with pytest.raises(ValueError, match=f"address {addr!r}".replace("[", r"\[")):
        netio.parse_addr(addr)


def test_listen_on_an_empty_host_binds_loopback_only():
    with netio.listen("", 0) as srv:
        assert srv.getsockname()[0] == "127.0.0.1"


def test_ipv6_loopback_round_trip():
    try:
        srv = netio.listen("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with srv:
        addr = netio.format_addr("::1", srv.getsockname()[1])
        with netio.connect(addr, timeout=5) as client:
            conn, _ = srv.accept()
            with conn:
                netio.FRAMING.send(client, Ping(1))
                assert netio.FRAMING.recv(conn, DECODER) == Ping(1)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        netio.set_timeouts(s, 5.0)
    return a, b


def test_frames_carry_payloads_that_land_in_caller_buffers():
    a, b = _pair()
    payloads = [bytes([i % 251]) * (i % 7) for i in range(1500)]  # more buffers than one sendmsg takes
    total = sum(map(len, payloads))
    sender = threading.Thread(target=netio.FRAMING.send, args=(a, Ping(1, total), payloads))
    sender.start()
    msg = netio.FRAMING.recv(b, DECODER, "sender")
    outs = [bytearray(len(p)) for p in payloads]
    netio.recv_scatter(b, [memoryview(o) for o in outs])
    sender.join()
    assert msg == Ping(1, total) and outs == payloads
    netio.FRAMING.send(a, Ping(2, 6), [memoryview(b"abc"), b"", bytearray(b"def")])
    assert netio.FRAMING.recv(b, DECODER) == Ping(2, 6)
    netio.discard(b, 3)
    out = bytearray(3)
    netio.recv_exact_into(b, memoryview(out))
    assert out == b"def"
    a.close()
    b.close()


@pytest.mark.parametrize("sent, error", [
    (netio.Framing(b"XYZ1", 1 << 10, "other").encode(Ping(1)), r"router: bad frame magic b'XYZ1', expected b'MIF1'"),
    (netio.PREFIX.pack(b"MIF1", 100 << 20), r"router: MatrixInfer frame header of 104857600 bytes exceeds 16777216"),
    (netio.FRAMING.encode(["not", "a", "ping"]), "router: undecodable MatrixInfer message"),
    (netio.FRAMING.encode(Ping(3))[:-1], "router closed the connection mid-frame"),
], ids=["other protocol", "huge header", "wrong message", "gone mid-frame"])
def test_a_peer_of_another_protocol_or_that_goes_away_is_a_wire_error(sent, error):
    a, b = _pair()
    with a, b:
        a.sendall(sent)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(netio.WireError, match=error):
            netio.FRAMING.recv(b, DECODER, "router")
    assert issubclass(netio.WireError, ConnectionError)  # callers that catch OSError keep working


def test_asyncio_reader_reads_frames_and_reports_a_clean_eof():
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(netio.FRAMING.encode(Ping(7)) + netio.FRAMING.encode(Ping(8)))
        reader.feed_eof()
        assert await netio.FRAMING.read(reader, DECODER) == Ping(7)
        assert await netio.FRAMING.read(reader, DECODER) == Ping(8)
        with pytest.raises(asyncio.IncompleteReadError):
            await netio.FRAMING.read(reader, DECODER)

    asyncio.run(main())
