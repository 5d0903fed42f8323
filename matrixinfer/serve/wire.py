"""Framing for the PDC control and KV planes: ``b"MIF1" | u32 header length | msgpack header``,
followed by raw payload bytes when the header says so (``KVChunk.nbytes``). No pickle."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgspec

MAGIC = b"MIF1"
PREFIX = struct.Struct("<4sI")
MAX_HEADER = 16 << 20


class WireError(ConnectionError):
    """A peer sent something that is not a valid frame (or went away mid-frame)."""


def encode(msg: Any) -> bytes:
    header = msgspec.msgpack.encode(msg)
    return PREFIX.pack(MAGIC, len(header)) + header


def _check(prefix: bytes, peer: str) -> int:
    magic, n = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise WireError(f"{peer}: bad frame magic {magic!r} (not a MatrixInfer peer?)")
    if n > MAX_HEADER:
        raise WireError(f"{peer}: frame header of {n} bytes exceeds {MAX_HEADER}")
    return n


async def read_msg(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder, peer: str = "peer") -> Any:
    """Next message from ``reader``; raises WireError (or IncompleteReadError at a clean EOF)."""
    n = _check(await reader.readexactly(PREFIX.size), peer)
    raw = await reader.readexactly(n)
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise WireError(f"{peer}: undecodable message ({exc})") from exc


def send_msg(sock: socket.socket, msg: Any, payload: memoryview | bytes | None = None) -> None:
    sock.sendall(encode(msg))
    if payload is not None:
        sock.sendall(payload)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise WireError("peer closed the connection mid-payload")
        got += n


def recv_msg(sock: socket.socket, decoder: msgspec.msgpack.Decoder, peer: str = "peer") -> Any:
    head = bytearray(PREFIX.size)
    recv_exact_into(sock, memoryview(head))
    n = _check(bytes(head), peer)
    raw = bytearray(n)
    recv_exact_into(sock, memoryview(raw))
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise WireError(f"{peer}: undecodable message ({exc})") from exc


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {addr!r} must be HOST:PORT")
    return host, int(port)
