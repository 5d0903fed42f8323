"""One client connection to one EMS server, with the same-host shared-memory fast path.

On the server's host (same machine, boot and network namespace) the connection talks over the
server's unix socket and maps the server's arena, whose descriptor the server sends with its
``Hello`` reply there (to clients of its own OS user only). A get first looks its keys up in the server's
shared index and copies what the index vouches for straight into the caller's buffer, with no round
trip (:mod:`matrixinfer.ems.index`), marking each slot read for the server's eviction; hit counts
reach the server now and then. Keys the index does not vouch for take the leased path: the server
pins them and answers with offsets, the client copies and releases the lease with its next request
(or an explicit release). A large put reserves blocks, copies into them and commits. Elsewhere
values travel over TCP, received directly into the caller's buffer.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from matrixinfer import auth, netio
from matrixinfer.ems import protocol as p
from matrixinfer.ems.arena import map_arena
from matrixinfer.ems.index import SUPPORTED as INDEX_SUPPORTED
from matrixinfer.ems.index import IndexReader
from matrixinfer.ems.local_read import LocalReader, copy_pairs, writable_view
from matrixinfer.ems.protocol import ErrorCode
from matrixinfer.ems.service import host_id

if TYPE_CHECKING:
    from typing_extensions import Buffer

FAST_PUT_MIN = 64 << 10  # below this a put's two round trips cost more than the socket copy
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: combining the flags per call costs a microsecond
HITS_EVERY_S = 1.0  # index hits are counted by the server at most this late (or at the next request)

_arenas: dict[str, memoryview] = {}  # server_id -> mapping, shared by every connection of a process
_arenas_lock = threading.Lock()
_HOST_ID = host_id()


class EmsError(Exception):
    """Base class of EMS client errors (misses and dead servers are not errors)."""


class EmsPermissionError(EmsError):
    """The server refused the namespace (undeclared or wrong token)."""


class EmsRefused(EmsError):
    """A live server refused to store a value; ``code`` says why (``QUOTA``, ``TOO_LARGE``, ``FULL``,
    ``KEY_TOO_LONG``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def readable_view(buf: object) -> memoryview:
    """A flat byte view of a value to store (bytes-like, numpy array, CPU torch tensor; else its str)."""
    try:
        view = memoryview(cast("Buffer", buf))  # one attempt is cheaper than checking the type first
    except TypeError:
        view = memoryview(buf.numpy()) if hasattr(buf, "numpy") else memoryview(str(buf).encode())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class ServerConnection:
    """A socket to one server bound to one namespace; not thread-safe (one per thread)."""

    def __init__(self, addr: str, namespace: str, token: str = "", timeout: float = 5.0,
                 connect_timeout: float = 0.5, fast_path: bool = True, secret: bytes | None = None) -> None:
        self.addr = addr
        self.peer = f"EMS server {addr}"  # names the server in errors
        self.secret = secret
        self.sock = socket.create_connection(netio.parse_addr(addr), timeout=connect_timeout)
        netio.set_timeouts(self.sock, timeout)
        p.tune_socket(self.sock)
        if secret is not None:
            try:
                auth.client_handshake(self.sock, secret, "ems", self.peer)
            except BaseException:
                self.sock.close()
                raise
        self._held_lease = 0  # a same-host read lease to drop with the next request
        self.last_used = time.monotonic()  # the client checks a connection idle for a while before reuse
        self._hits = 0  # reads served from the shared index, not yet reported
        self._hits_sent = float("-inf")
        self.reads: Counter[str] = Counter()  # same-host keys read via "index", "lease"; index "conflict"s
        reply = self._call(p.Hello(namespace=namespace, token=token))
        if reply.code == ErrorCode.REFUSED:
            self.close()
            raise EmsPermissionError(f"EMS server {addr}: {reply.error}")
        self.server_id = reply.server_id
        self.arena: memoryview | None = None
        self.index: IndexReader | None = None
        self.local: LocalReader | None = None  # reads through the index
        same_host = fast_path and reply.host_id == _HOST_ID
        if same_host and reply.local_addr:
            moved = self._move_to_local(reply.local_addr, namespace, token, timeout, connect_timeout)
            if moved is not None:
                reply, fd = moved
                if fd is not None:
                    self.arena = self._map(reply.server_id, fd, reply.arena_size)
        if self.arena is not None and INDEX_SUPPORTED and reply.index_slots:
            self.index = IndexReader(self.arena[reply.index_offset:], reply.index_slots, reply.index_offset)
            self.salt = reply.index_salt
            self.local = LocalReader(self.index, self.arena, self.salt)

    def _move_to_local(self, local_addr: str, namespace: str, token: str, timeout: float,
                       connect_timeout: float) -> tuple[p.Reply, int | None] | None:
        """Go on over the server's unix socket (cheaper round trips than loopback TCP), with the
        arena's descriptor when the server hands it over (same OS user); None, staying on TCP, when
        that socket is not reachable."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(local_addr)
            netio.set_timeouts(sock, timeout)
            if self.secret is not None:
                auth.client_handshake(sock, self.secret, "ems", self.peer)
            p.send_frame(sock, p.Hello(namespace=namespace, token=token))
            reply, fd = p.recv_reply_with_fd(sock, self.peer)
        except OSError:  # includes netio.WireError
            sock.close()
            return None
        if reply.code or reply.server_id != self.server_id:
            if fd is not None:
                os.close(fd)
            sock.close()
            return None
        self.sock.close()
        self.sock = sock
        return reply, fd

    @staticmethod
    def _map(server_id: str, fd: int, size: int) -> memoryview | None:
        """The process's mapping of a server's arena (made from ``fd`` the first time; ``fd`` is closed)."""
        try:
            with _arenas_lock:
                if server_id not in _arenas:
                    try:
                        _arenas[server_id] = map_arena(fd, size)
                    except OSError:
                        return None  # an unusable descriptor: values travel over the socket
                return _arenas[server_id]
        finally:
            os.close(fd)

    def closed_by_server(self) -> bool:
        """Whether the server has closed this connection (it closes idle ones; a restart closes all)."""
        try:
            return self.sock.recv(1, _PEEK) == b""
        except BlockingIOError:
            return False  # nothing to read: open
        except OSError:
            return True

    def _call(self, req: p.Request, payloads: Sequence[Buffer] = ()) -> p.Reply:
        self.last_used = time.monotonic()
        self._report_hits(force=True)
        if self._held_lease:  # the last same-host read is done: drop its pins with this request
            if isinstance(req, p.Get):
                req.release = self._held_lease
            else:
                p.send_frame(self.sock, p.Release(lease=self._held_lease))
            self._held_lease = 0
        p.send_frame(self.sock, req, payloads)
        return p.recv_reply(self.sock, self.peer)

    def release(self) -> None:
        """Drop the pins of the last same-host read now rather than with the next request, and
        report the reads served from the shared index."""
        self._report_hits(force=True)
        if self._held_lease:
            p.send_frame(self.sock, p.Release(lease=self._held_lease))
            self._held_lease = 0

    def _report_hits(self, force: bool = False) -> None:
        if self._hits and (force or time.monotonic() - self._hits_sent >= HITS_EVERY_S):
            count, self._hits = self._hits, 0
            self._hits_sent = time.monotonic()
            p.send_frame(self.sock, p.IndexHits(count=count))  # no reply to wait for

    def close(self) -> None:
        """Close the socket (the server releases this connection's leases)."""
        try:
            self._report_hits(force=True)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def get_many(self, keys: list[bytes], outs: Sequence[object] | None) -> list[object]:
        """Values of ``keys``: with ``outs``, bytes written into each buffer (None on a miss);
        without, a new bytearray per hit (None on a miss)."""
        arena = self.arena
        self.last_used = time.monotonic()
        if arena is None:
            return self._get_tcp(keys, None if outs is None else [writable_view(o) for o in outs])
        results: list[object] = [None] * len(keys)
        rest: Sequence[int] = self._get_from_index(keys, outs, results) if self.local is not None else range(len(keys))
        if rest:
            self.reads["lease"] += len(rest)
            rest_keys = [keys[i] for i in rest]
            reply = self._call(p.Get(keys=rest_keys, lease=True))
            try:
                got = self._copy_out(arena, reply, rest_keys,
                                     None if outs is None else [writable_view(outs[i]) for i in rest])
            finally:
                self._held_lease = reply.lease  # released by the next request (or by closing)
            for i, r in zip(rest, got):
                results[i] = r
        elif self._held_lease:  # no request to carry the last leased read's release: send it now
            self.release()
        self._report_hits()
        return results

    def _get_from_index(self, keys: list[bytes], outs: Sequence[object] | None, results: list[object]) -> list[int]:
        """Copy the values the shared index vouches for into ``results`` (see the module
        docstring); returns the positions left to the leased path. A value changed during its copy
        is copied again by that path, so the caller's buffer may briefly hold other bytes."""
        try:
            eof = self.sock.recv(1, _PEEK) == b""
        except BlockingIOError:
            eof = False  # nothing to read: the server is alive, so its index is current
        if eof:  # a dead server's index is frozen, not current: never read it
            raise ConnectionError(f"EMS server {self.addr} closed the connection")
        index, local = self.index, self.local
        if index is None or local is None or not index.is_open():
            return list(range(len(keys)))
        rest, hits, conflicts = local.read(keys, outs, results)
        if hits:
            self._hits += hits
            self.reads["index"] += hits
        if conflicts:
            self.reads["conflict"] += conflicts
        return rest

    def _get_tcp(self, keys: list[bytes], views: list[memoryview] | None) -> list[object]:
        reply = self._call(p.Get(keys=keys))
        results: list[object] = []
        dests: list[memoryview] = []  # where each returned value lands, in stream order
        too_small = None
        for i, size in enumerate(reply.sizes):
            if size == p.MISS:
                results.append(None)
            elif views is None:
                buf = bytearray(size)
                dests.append(memoryview(buf))
                results.append(buf)
            elif len(views[i]) < size:
                dests.append(memoryview(bytearray(size)))  # keep the stream in step, then complain
                too_small = too_small or (keys[i], size, len(views[i]))
                results.append(None)
            else:
                dests.append(views[i][:size])
                results.append(size)
        netio.recv_scatter(self.sock, dests, self.peer)
        if too_small:
            raise ValueError(f"buffer for key {too_small[0]!r} holds {too_small[2]} bytes, value has {too_small[1]}")
        return results

    def _copy_out(self, arena: memoryview, reply: p.Reply, keys: list[bytes],
                  views: list[memoryview] | None) -> list[object]:
        results: list[object] = []
        big: list[tuple[memoryview, memoryview]] = []  # copies from the arena, done after the loop
        too_small = None
        for i, (size, off) in enumerate(zip(reply.sizes, reply.offsets)):
            if size == p.MISS:
                results.append(None)
                continue
            if views is not None and len(views[i]) < size:
                if off == p.INLINE:
                    netio.discard(self.sock, size, self.peer)  # keep the stream in step, then complain
                too_small = too_small or (keys[i], size, len(views[i]))
                results.append(None)
                continue
            dst = memoryview(bytearray(size)) if views is None else views[i][:size]
            if off == p.INLINE:  # served from the SSD tier without promotion: bytes follow
                netio.recv_exact_into(self.sock, dst, self.peer)
            else:
                big.append((dst, arena[off:off + size]))
            results.append(dst.obj if views is None else size)
        copy_pairs(big, sum(len(d) for d, _ in big))
        if too_small:
            raise ValueError(f"buffer for key {too_small[0]!r} holds {too_small[2]} bytes, value has {too_small[1]}")
        return results

    def put_many(self, keys: list[bytes], values: Sequence[object]) -> list[ErrorCode]:
        """Store values; returns a refusal code per key (``ErrorCode.OK`` when stored)."""
        views = [readable_view(v) for v in values]
        sizes = [len(v) for v in views]
        arena = self.arena
        if arena is not None and sum(sizes) >= FAST_PUT_MIN:
            codes = [ErrorCode.RETRY] * len(keys)
            while pending := [i for i, c in enumerate(codes) if c == ErrorCode.RETRY]:
                reply = self._call(p.Reserve(keys=[keys[i] for i in pending], sizes=[sizes[i] for i in pending]))
                if reply.code:  # the whole request was refused: nothing was reserved
                    for i in pending:
                        codes[i] = reply.code
                    break
                try:
                    for i, off in zip(pending, reply.offsets):
                        if off >= 0:
                            arena[off:off + sizes[i]] = views[i]
                except BaseException:
                    self._call(p.Commit(reservation=reply.lease, abort=True))
                    raise
                self._call(p.Commit(reservation=reply.lease))
                for i, code in zip(pending, reply.codes):
                    codes[i] = code
            return codes
        return self._call(p.Put(keys=keys, sizes=sizes), views).codes

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """Presence of each key."""
        return self._call(p.Exists(keys=keys)).found

    def delete_many(self, keys: list[bytes]) -> list[bool]:
        """Delete each key; True where something was removed."""
        return self._call(p.Delete(keys=keys)).found


def server_stats(addr: str, namespace: str = "default", token: str = "", timeout: float = 2.0,
                 secret: bytes | None = None) -> dict:
    """The stats dict of one server, asked from a session of ``namespace`` (a namespace protected by
    a token shows only to its own sessions; ``secret``: the deployment secret the server requires)."""
    peer = f"EMS server {addr}"
    with netio.connect(addr, timeout=timeout) as sock:
        if secret is not None:
            auth.client_handshake(sock, secret, "ems", peer)
        p.send_frame(sock, p.Hello(namespace=namespace, token=token))
        reply = p.recv_reply(sock, peer)
        if reply.code:
            raise EmsPermissionError(f"{peer}: {reply.error}")
        p.send_frame(sock, p.Stats())
        return p.recv_reply(sock, peer).stats
