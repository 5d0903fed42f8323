"""EMS wire format: a fixed prefix, a typed msgpack header, then raw value bytes. No pickle.

Frames are :mod:`matrixinfer.netio`'s with the magic ``b"EMS1"``: ``EMS1 | u32 header length |
header | payloads``; the header says how many payload bytes follow (``Put.sizes`` on requests,
``Reply.sizes`` on replies to ``Get``), so values move between sockets and arenas or caller buffers
with no intermediate copy. Every refusal is one :class:`ErrorCode`.
"""

from __future__ import annotations

import os
import socket
import struct
from enum import StrEnum

import msgspec

from matrixinfer import envs, netio

MAX_KEY = 4096  # bytes; the SSD tier's header stores key lengths in 16 bits
MISS = -1  # a size of -1 in Reply.sizes marks a missing key
INLINE = -2  # an offset of -2 in a leased Get reply: the value's bytes follow the header instead


class ErrorCode(StrEnum):
    """Why a request or a key was refused: ``Reply.code`` and ``Reply.codes`` (Mooncake's one
    ``ErrorCode`` for every refusal). ``OK`` is the empty string, so ``if reply.code:`` tests failure."""

    OK = ""
    NO_SESSION = "no_session"  # a request before Hello
    REFUSED = "refused"  # Hello: namespace undeclared on a closed server, or wrong token
    BAD_REQUEST = "bad_request"  # malformed request (e.g. keys and sizes of different lengths)
    UNSUPPORTED = "unsupported"  # a request this peer does not serve (server vs controller)
    UNKNOWN_LEASE = "unknown_lease"  # controller: KeepAlive of an expired or unknown lease
    KEY_TOO_LONG = "key_too_long"  # a key over MAX_KEY bytes
    QUOTA = "quota"  # the value exceeds its namespace's quota (or the rest of the quota is pinned)
    TOO_LARGE = "too_large"  # the value exceeds the whole arena
    FULL = "full"  # nothing more can be evicted: every entry is pinned or being written
    RETRY = "retry"  # Reserve: commit the blocks granted so far, then ask again for this key
    ERROR = "error"  # any other store refusal


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

    code: ErrorCode = ErrorCode.OK
    error: str = ""
    sizes: list[int] = []  # Get: value lengths (MISS when absent); bytes follow unless leased
    offsets: list[int] = []  # leased Get / Reserve: arena offsets
    codes: list[ErrorCode] = []  # Put / Reserve: per-key refusal codes (OK when stored)
    found: list[bool] = []  # Exists / Delete
    lease: int = 0  # leased Get / Reserve / Register: the id to release, commit or keep alive
    server_id: str = ""  # Hello: changes on every restart
    host_id: str = ""
    arena_fd: bool = False  # Hello on the unix socket: the arena's descriptor rides with this reply
    arena_size: int = 0  # Hello: bytes of the whole segment (values, then the shared index)
    index_offset: int = 0  # Hello: where the shared index starts in the segment (0: none)
    index_slots: int = 0
    index_salt: bytes = b""  # Hello: the key of this namespace's index tags
    local_addr: str = ""  # Hello: a unix socket address for same-host clients
    members: list[str] = []
    stats: dict = {}


FRAMING = netio.Framing(b"EMS1", 64 << 20, "EMS")
send_frame = FRAMING.send  # (sock, header, payloads=()): the header, then its payload buffers
_request_decoder = msgspec.msgpack.Decoder(Request)
request_decoder = _request_decoder
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def recv_request(sock: socket.socket, peer: str = "EMS client") -> Request:
    """Read one request header (payloads, if any, are left on the socket)."""
    req: Request = FRAMING.recv(sock, _request_decoder, peer)
    return req


def recv_reply(sock: socket.socket, peer: str = "EMS server") -> Reply:
    """Read one reply header (payloads, if any, are left on the socket)."""
    reply: Reply = FRAMING.recv(sock, _reply_decoder, peer)
    return reply


def send_reply_with_fd(sock: socket.socket, reply: Reply, fd: int) -> None:
    """Send ``reply`` with the descriptor ``fd`` attached (SCM_RIGHTS, unix sockets only)."""
    frame = FRAMING.encode(reply)
    sent = socket.send_fds(sock, [frame], [fd])
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_reply_with_fd(sock: socket.socket, peer: str = "EMS server") -> tuple[Reply, int | None]:
    """Read one reply header and the descriptor attached to it, if any (the caller owns it)."""
    data, fds, _, _ = socket.recv_fds(sock, netio.PREFIX.size, 1, socket.MSG_WAITALL)
    fd = fds[0] if fds else None
    for extra in fds[1:]:
        os.close(extra)
    try:
        prefix = bytearray(data)
        if not prefix:
            raise netio.WireError(f"{peer} closed the connection")
        if len(prefix) < netio.PREFIX.size:
            rest = bytearray(netio.PREFIX.size - len(prefix))
            netio.recv_exact_into(sock, memoryview(rest), peer)
            prefix += rest
        header = netio.recv_announced(sock, FRAMING.header_length(prefix, peer), peer)
        reply: Reply = FRAMING.decode(header, _reply_decoder, peer)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return reply, fd


def refuse_unauthenticated(conn: socket.socket) -> None:
    """Answer the first request of a client that skipped the handshake with REFUSED (reading that
    small request first, so the answer is not lost to a reset), before the connection closes."""
    try:
        prefix = bytearray(netio.PREFIX.size - len(FRAMING.magic))
        netio.recv_exact_into(conn, memoryview(prefix))
        (n,) = struct.unpack("<I", prefix)
        if n <= 4096:
            netio.discard(conn, n)
            send_frame(conn, Reply(code=ErrorCode.REFUSED, error="this server requires the deployment "
                                       "secret (MATRIXINFER_SECRET or --secret-file)"))
    except OSError:
        pass


def tune_socket(sock: socket.socket) -> None:
    """Low latency for small requests; buffer sizes are the kernel's autotuning unless
    ``MATRIXINFER_EMS_SOCKET_BUFFER`` sets them."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if size := envs.ems_socket_buffer():
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
