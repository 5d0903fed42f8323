"""Sockets between MatrixInfer processes: one framing for msgspec messages, addresses, one error.

A frame is ``magic (4 bytes) | u32 little-endian header length | msgpack header``, followed by raw
payload bytes when the header says how many (``KVChunk.nbytes``, EMS's ``Put.sizes``): tensors and
values move between sockets and caller buffers with no intermediate copy and no pickle. Each
protocol is a :class:`Framing` with its own magic, so a peer of the wrong kind fails with a clear
:class:`WireError` instead of a decoding error: :data:`FRAMING` (``MIF1``) carries the PDC control
and KV planes; EMS has its own (``EMS1``, :mod:`matrixinfer.ems.protocol`).

Addresses are ``HOST:PORT`` or ``[IPV6]:PORT``. An empty host means loopback (127.0.0.1), never
all interfaces: serving beyond this machine must be asked for (``0.0.0.0:PORT``).

Standard library and msgspec only (no torch), so every process may import it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import asyncio

    from typing_extensions import Buffer

PREFIX = struct.Struct("<4sI")  # magic, header length
LOOPBACK = "127.0.0.1"
MAX_IOV = 512  # buffers per sendmsg/recvmsg_into call (the kernel's limit is IOV_MAX = 1024)

_encoder = msgspec.msgpack.Encoder()


class WireError(ConnectionError):
    """A peer sent something that is not a valid frame, or went away in the middle of one."""


class PeerClosed(WireError):
    """The peer closed the connection (between frames or in the middle of one)."""


class MessageError(WireError):
    """A whole frame arrived but its header is not a valid message (a bad value, a peer of another
    version). The stream is still in step, so a receiver that expects no payload after such a
    message may answer it and read on instead of dropping the connection."""

    def __init__(self, message: str, header: bytes) -> None:
        super().__init__(message)
        self.header = header

    def field(self, name: str) -> str | None:
        """A top-level string field of the undecodable message (e.g. its ``request_id``), if any."""
        try:
            obj = msgspec.msgpack.decode(self.header)
        except Exception:  # noqa: BLE001 - not even msgpack: nothing to recover
            return None
        value = obj.get(name) if isinstance(obj, dict) else None
        return value if isinstance(value, str) else None


class Framing:
    """One protocol's frames: a 4-byte ``magic`` and the largest header it accepts.

    Headers are encoded with msgspec's msgpack encoder and decoded with the caller's typed decoder;
    payload bytes, if any, stay on the socket for the caller to receive where they belong.
    """

    __slots__ = ("magic", "max_header", "name")

    def __init__(self, magic: bytes, max_header: int, name: str) -> None:
        if len(magic) != 4:
            raise ValueError(f"frame magic {magic!r} must be 4 bytes")
        self.magic = magic
        self.max_header = max_header
        self.name = name  # what a peer speaking it is called in errors

    def __repr__(self) -> str:
        return f"Framing({self.magic!r}, max_header={self.max_header}, name={self.name!r})"

    def encode(self, msg: Any) -> bytes:
        """``msg`` as one frame (prefix and header) without payload."""
        header = _encoder.encode(msg)
        return PREFIX.pack(self.magic, len(header)) + header

    def header_length(self, prefix: bytes | bytearray, peer: str = "peer") -> int:
        """The header length a received prefix announces; WireError when it is not one of ours."""
        magic, n = PREFIX.unpack(prefix)
        if magic != self.magic:
            raise WireError(f"{peer}: bad frame magic {magic!r}, expected {self.magic!r} (not a {self.name} peer?)")
        if n > self.max_header:
            raise WireError(f"{peer}: {self.name} frame header of {n} bytes exceeds {self.max_header}")
        return n

    def decode(self, header: Buffer, decoder: msgspec.msgpack.Decoder, peer: str = "peer") -> Any:
        """The message in a received header; MessageError when it is not a valid one."""
        try:
            return decoder.decode(header)
        except (msgspec.DecodeError, RecursionError) as exc:  # DecodeError includes ValidationError
            raise MessageError(f"{peer}: undecodable {self.name} message ({exc})", bytes(header)) from exc

    def send(self, sock: socket.socket, msg: Any, payloads: Sequence[Buffer] = ()) -> None:
        """Send ``msg`` and then each payload's bytes, in as few system calls as possible."""
        bufs = [memoryview(self.encode(msg))]
        for payload in payloads:
            view = memoryview(payload)
            if view.nbytes:
                bufs.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
        send_buffers(sock, bufs)

    def recv(self, sock: socket.socket, decoder: msgspec.msgpack.Decoder, peer: str = "peer") -> Any:
        """The next message on a blocking socket (its payload, if any, is left on the socket)."""
        prefix = bytearray(PREFIX.size)
        recv_exact_into(sock, memoryview(prefix), peer)
        return self.decode(recv_announced(sock, self.header_length(prefix, peer), peer), decoder, peer)

    async def read(self, reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder, peer: str = "peer") -> Any:
        """The next message from an asyncio stream; WireError, or IncompleteReadError at a clean EOF."""
        n = self.header_length(await reader.readexactly(PREFIX.size), peer)
        return self.decode(await reader.readexactly(n), decoder, peer)


FRAMING = Framing(b"MIF1", 16 << 20, "MatrixInfer")
"""The PDC control and KV planes' framing (router, prefill and decode workers)."""


# -- raw bytes ----------------------------------------------------------------------------------
EAGER_BYTES = 1 << 16  # an announced length up to this is allocated at once; beyond, as bytes arrive


def recv_announced(sock: socket.socket, n: int, peer: str = "peer") -> bytearray:
    """``n`` bytes that a peer announced: memory grows with the bytes that actually arrive (at most
    doubling), so a header that claims 64 MiB and sends nothing costs 64 KiB, not 64 MiB."""
    buf = bytearray(min(n, EAGER_BYTES))
    recv_exact_into(sock, memoryview(buf), peer)
    while len(buf) < n:
        got = len(buf)
        buf.extend(bytes(min(n - got, got)))  # double at most
        recv_exact_into(sock, memoryview(buf)[got:], peer)
    return buf


def _advance(bufs: list[memoryview], i: int, done: int) -> int:
    """Move past ``done`` bytes of ``bufs[i:]`` (a partial buffer is replaced by its rest); the new ``i``."""
    while done and i < len(bufs):
        head = bufs[i]
        if done >= len(head):
            done -= len(head)
            i += 1
        else:
            bufs[i] = head[done:]
            done = 0
    return i


def send_buffers(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Send every byte of ``bufs`` (flat byte views) in order with gathered writes (``sendmsg``)."""
    i = 0
    while i < len(bufs):
        i = _advance(bufs, i, sock.sendmsg(bufs[i:i + MAX_IOV]))


def recv_exact_into(sock: socket.socket, view: memoryview, peer: str = "peer") -> None:
    """Fill ``view`` (a flat byte view) from the socket; WireError if the peer closes first.

    ``MSG_WAITALL`` lets the kernel gather a large payload in one call on blocking sockets (see
    :func:`set_timeouts`); on sockets with a Python-level timeout it is harmless.
    """
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise PeerClosed(f"{peer} closed the connection mid-frame ({got} of {n} bytes received)")
        got += k


def recv_scatter(sock: socket.socket, views: Sequence[memoryview], peer: str = "peer") -> None:
    """Fill every view in order, in as few system calls as possible (``recvmsg_into``)."""
    bufs = [v for v in views if len(v)]
    i = 0
    while i < len(bufs):
        k = sock.recvmsg_into(bufs[i:i + MAX_IOV], 0, socket.MSG_WAITALL)[0]
        if k == 0:
            raise PeerClosed(f"{peer} closed the connection mid-frame")
        i = _advance(bufs, i, k)


def discard(sock: socket.socket, n: int, peer: str = "peer") -> None:
    """Receive and drop ``n`` bytes (a refused payload), keeping the stream in step."""
    scratch = memoryview(bytearray(min(n, 1 << 20)))
    while n > 0:
        k = min(n, len(scratch))
        recv_exact_into(sock, scratch[:k], peer)
        n -= k


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """A blocking socket with kernel send/receive timeouts, so ``MSG_WAITALL`` reads stay whole.

    (A Python-level ``settimeout`` makes the socket non-blocking, which splits every large read
    into many small ones.) A timed-out call raises ``OSError`` (EAGAIN).
    """
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


# -- addresses ----------------------------------------------------------------------------------
def parse_addr(addr: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[IPV6]:PORT"`` or ``":PORT"`` (loopback) -> ``(host, port)``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {addr!r} is not HOST:PORT (a port from 0 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or "[" in host or "]" in host:
            raise ValueError(f"address {addr!r}: empty or malformed [IPV6] host")
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"address {addr!r}: an IPv6 host needs brackets, e.g. [::1]:{port}")
    return host or LOOPBACK, int(port)


def format_addr(host: str, port: int) -> str:
    """The inverse of :func:`parse_addr` (brackets around an IPv6 host)."""
    host = host or LOOPBACK
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host`` (IPv4 or IPv6; empty: loopback) and ``port`` (0: any free)."""
    host = host or LOOPBACK
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


def connect(addr: str, timeout: float | None = None) -> socket.socket:
    """A TCP connection to ``HOST:PORT`` with Nagle's delay off (every protocol here is request/reply)."""
    sock = socket.create_connection(parse_addr(addr), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
