"""EMS wire format: a fixed prefix, a typed msgpack header, then raw value bytes. No pickle.

A frame is ``b"EMS1" | u32 header length | header | payloads``; the header says how many payload
bytes follow (``Put.sizes`` on requests, ``Reply.sizes`` on replies to ``Get``), so values move
between sockets and arenas or caller buffers with no intermediate copy.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

import msgspec

MAGIC = b"EMS1"
PREFIX = struct.Struct("<4sI")
MAX_HEADER = 64 << 20
MAX_KEY = 4096  # bytes; the SSD tier's header stores key lengths in 16 bits
MISS = -1  # a size of -1 in Reply.sizes marks a missing key
INLINE = -2  # an offset of -2 in a leased Get reply: the value's bytes follow the header instead


class Hello(msgspec.Struct, tag=True):
    """Open a session bound to one namespace (the token must match a protected namespace's)."""

    namespace: str
    token: str = ""


class Put(msgspec.Struct, tag=True):
    """Store ``keys``; ``sizes[i]`` bytes of each value follow the header in order."""

    keys: list[bytes]
    sizes: list[int]


class Get(msgspec.Struct, tag=True):
    """Fetch ``keys``. With ``lease`` the reply carries arena offsets instead of bytes (same host);
    ``release`` drops the previous read lease first (saves a message per same-host get)."""

    keys: list[bytes]
    lease: bool = False
    release: int = 0


class Exists(msgspec.Struct, tag=True):
    """Which of ``keys`` are present in either tier."""

    keys: list[bytes]


class Delete(msgspec.Struct, tag=True):
    """Remove ``keys`` from both tiers."""

    keys: list[bytes]


class Reserve(msgspec.Struct, tag=True):
    """Same-host put, step 1: reserve arena blocks the client fills through shared memory."""

    keys: list[bytes]
    sizes: list[int]


class Commit(msgspec.Struct, tag=True):
    """Same-host put, step 2: publish (or with ``abort`` drop) a reservation's blocks."""

    reservation: int
    abort: bool = False


class Release(msgspec.Struct, tag=True):
    """Drop a read lease (fire and forget: the server sends no reply)."""

    lease: int


class IndexHits(msgspec.Struct, tag=True):
    """Same-host reads served from the shared index since the last report, for the hit counters
    (fire and forget: the server sends no reply)."""

    count: int


class Stats(msgspec.Struct, tag=True):
    """Usage and counters per namespace."""


class Register(msgspec.Struct, tag=True):
    """Controller: a server joins the ring for ``ttl`` seconds unless kept alive."""

    addr: str
    ttl: float


class KeepAlive(msgspec.Struct, tag=True):
    """Controller: extend a membership lease."""

    lease: int


class Members(msgspec.Struct, tag=True):
    """Controller: the addresses of live servers."""


Request = (Hello | Put | Get | Exists | Delete | Reserve | Commit | Release | IndexHits | Stats | Register | KeepAlive
           | Members)


class Reply(msgspec.Struct, omit_defaults=True):
    """Answer to any request; ``code`` is empty on success, else names the refusal."""

    code: str = ""
    error: str = ""
    sizes: list[int] = []  # Get: value lengths (MISS when absent); bytes follow unless leased
    offsets: list[int] = []  # leased Get / Reserve: arena offsets
    codes: list[str] = []  # Put / Reserve: per-key refusal codes ("" when stored)
    found: list[bool] = []  # Exists / Delete
    lease: int = 0  # leased Get / Reserve / Register: the id to release, commit or keep alive
    server_id: str = ""  # Hello: changes on every restart
    host_id: str = ""
    arena_path: str = ""
    arena_size: int = 0  # Hello: bytes of the whole segment (values, then the shared index)
    index_offset: int = 0  # Hello: where the shared index starts in the segment (0: none)
    index_slots: int = 0
    index_salt: bytes = b""  # Hello: the key of this namespace's index tags
    local_addr: str = ""  # Hello: a unix socket address for same-host clients
    members: list[str] = []
    stats: dict = {}


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


class ProtocolError(ConnectionError):
    """The peer sent something that is not an EMS frame."""


def send_frame(sock: socket.socket, header: msgspec.Struct, payloads: Sequence = ()) -> None:
    """Send a header and its payload buffers with as few syscalls as possible."""
    body = _encoder.encode(header)
    bufs = [memoryview(PREFIX.pack(MAGIC, len(body)) + body)]
    bufs += [memoryview(p).cast("B") for p in payloads if len(p)]
    while bufs:
        sent = sock.sendmsg(bufs[:512])
        while sent:
            if sent >= len(bufs[0]):
                sent -= len(bufs.pop(0))
            else:
                bufs[0] = bufs[0][sent:]
                sent = 0


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket (raises ConnectionError on EOF).

    ``MSG_WAITALL`` lets the kernel gather a large value in one call on blocking sockets (see
    :func:`set_timeouts`); it is harmless on sockets with a Python-level timeout.
    """
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise ConnectionError("EMS peer closed the connection mid-frame")
        got += k


def recv_scatter(sock: socket.socket, views: list[memoryview]) -> None:
    """Fill every view in order with as few syscalls as possible (``recvmsg_into``)."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        n = sock.recvmsg_into(views[i:i + 512], 0, socket.MSG_WAITALL)[0]
        if n == 0:
            raise ConnectionError("EMS peer closed the connection mid-frame")
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def discard(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (a refused value's payload)."""
    scratch = memoryview(bytearray(min(n, 1 << 20)))
    while n > 0:
        k = min(n, len(scratch))
        recv_exact(sock, scratch[:k])
        n -= k


def _recv_header(sock: socket.socket) -> bytes:
    prefix = bytearray(PREFIX.size)
    recv_exact(sock, memoryview(prefix))
    magic, length = PREFIX.unpack(prefix)
    if magic != MAGIC or length > MAX_HEADER:
        raise ProtocolError(f"bad EMS frame prefix {bytes(prefix)!r} (expected magic {MAGIC!r})")
    body = bytearray(length)
    recv_exact(sock, memoryview(body))
    return bytes(body)


def recv_request(sock: socket.socket) -> Request:
    """Read one request header (payloads, if any, are left on the socket)."""
    try:
        return _request_decoder.decode(_recv_header(sock))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable EMS request: {exc}") from exc


def recv_reply(sock: socket.socket) -> Reply:
    """Read one reply header (payloads, if any, are left on the socket)."""
    try:
        return _reply_decoder.decode(_recv_header(sock))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable EMS reply: {exc}") from exc


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking socket with kernel send/receive timeouts, so ``MSG_WAITALL`` reads stay whole.

    (A Python-level ``settimeout`` makes the socket non-blocking, which splits every large read
    into many small ones.) A timed-out call raises ``OSError`` (EAGAIN).
    """
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"EMS address {addr!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)
