"""The EMS SDK: put/get/exists/delete over the whole pool, batched and async forms.

Keys are placed by a :class:`~matrixinfer.ems.ring.HashRing` over the live servers of a
:class:`~matrixinfer.ems.membership.Membership` view (refreshed every ``refresh_s``), optionally on
``replicas`` servers. Batched calls send one request per server. A server that cannot be reached
within ``connect_timeout`` is skipped for ``retry_after`` seconds: its keys read as misses and its
puts report False, never raise. Each thread gets its own connections, so one client may be shared
by threads and by the async forms (which run the blocking calls in worker threads).

Example::

    client = EmsClient(servers=["127.0.0.1:7000"], namespace="deepseek-v3/tenant-a")
    client.put(b"k", b"value")
    n = client.get_into(b"k", out_array)   # lands directly in out_array's memory
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, overload

from matrixinfer.auth import AuthError
from matrixinfer.ems.connection import EmsError, EmsPermissionError, EmsRefused, ServerConnection
from matrixinfer.ems.membership import Membership, StaticMembership
from matrixinfer.ems.protocol import ErrorCode
from matrixinfer.ems.ring import DEFAULT_VNODES, HashRing

__all__ = ["EmsClient", "EmsError", "EmsPermissionError", "EmsRefused", "ErrorCode"]

log = logging.getLogger(__name__)
Key = bytes | str
STALE_CHECK_S = 1.0  # a connection idle this long is checked for a close by the server before reuse
T = TypeVar("T")
R = TypeVar("R")


def _keys(keys: Sequence[Key]) -> list[bytes]:
    return [k.encode() if isinstance(k, str) else bytes(k) for k in keys]


def _pick(items: Sequence[T], positions: Sequence[int]) -> list[T]:
    """``items`` at ``positions``; ``items`` itself when it is a list and ``positions`` all of it in order."""
    if isinstance(items, list) and isinstance(positions, range) and positions == range(len(items)):
        return items
    return [items[i] for i in positions]


class EmsClient:
    """Client of an EMS pool bound to one namespace (see the module docstring)."""

    def __init__(self, servers: Sequence[str] | None = None, *, membership: Membership | None = None,
                 namespace: str = "default", token: str = "", replicas: int = 1, timeout: float = 5.0,
                 connect_timeout: float = 0.5, retry_after: float = 1.0, refresh_s: float = 1.0,
                 fast_path: bool = True, vnodes: int = DEFAULT_VNODES, secret: bytes | None = None) -> None:
        if (servers is None) == (membership is None):
            raise ValueError("give EmsClient either servers=[...] or membership=...")
        self.membership = membership or StaticMembership(list(servers or []))
        self.namespace, self.token = namespace, token
        self.secret = secret  # the deployment secret the servers require (matrixinfer.auth), if any
        self.replicas = max(1, replicas)
        self.timeout, self.connect_timeout, self.retry_after = timeout, connect_timeout, retry_after
        self.refresh_s = float("inf") if isinstance(self.membership, StaticMembership) else refresh_s
        self.fast_path, self.vnodes = fast_path, vnodes
        self._local = threading.local()
        self._all_conns: list[ServerConnection] = []
        self._lock = threading.Lock()
        self._down: dict[str, float] = {}  # addr -> time before which it is not retried
        self._executor: ThreadPoolExecutor | None = None
        self.ring = HashRing([], vnodes)
        self.refresh()  # an unreachable view starts empty (every key a miss) and is retried

    # -- ring and connections --------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the membership view now (a failing view keeps the last ring)."""
        self._refreshed = time.monotonic()
        try:
            members = self.membership.members()
        except Exception:  # noqa: BLE001 - controller or etcd unreachable: keep serving the old view
            return
        if members != self.ring.nodes:
            self.ring = HashRing(members, self.vnodes)

    def _ring(self) -> HashRing:
        if time.monotonic() - self._refreshed > self.refresh_s:
            self.refresh()
        return self.ring

    def _conn(self, addr: str) -> ServerConnection | None:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(addr)
        if conn is not None:
            if time.monotonic() - conn.last_used < STALE_CHECK_S or not conn.closed_by_server():
                return conn
            conns.pop(addr)  # closed while idle (the server's idle timeout): connect again
            conn.close()
        if self._down.get(addr, 0.0) > time.monotonic():
            return None
        try:
            conn = ServerConnection(addr, self.namespace, self.token, self.timeout, self.connect_timeout,
                                    self.fast_path, self.secret)
        except EmsPermissionError:
            raise
        except AuthError as exc:  # not a network fault: say so, then treat the server as down
            log.warning("%s", exc)
            self._mark_down(addr)
            return None
        except (OSError, EmsError):
            self._mark_down(addr)
            return None
        conns[addr] = conn
        with self._lock:
            self._all_conns.append(conn)
        return conn

    def _mark_down(self, addr: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(addr, None)
        if conn is not None:
            conn.close()
        self._down[addr] = time.monotonic() + self.retry_after

    def _on_servers(self, keys: list[bytes], op: Callable[[ServerConnection, list[bytes], Sequence[int]], list[R]],
                    rank: int = 0, idxs: list[int] | None = None) -> dict[int, R]:
        """Run ``op(conn, keys_of_server, positions)`` once per server owning keys at replica ``rank``."""
        ring = self._ring()
        positions = range(len(keys)) if idxs is None else idxs
        groups: Mapping[str, Sequence[int]]
        if len(ring.nodes) <= 1:  # one server owns every key: no placement per key
            groups = {ring.nodes[0]: positions} if ring.nodes and rank == 0 else {}
        else:
            by_owner: defaultdict[str, list[int]] = defaultdict(list)
            for i in positions:
                owners = ring.owners(keys[i], self.replicas)
                if rank < len(owners):
                    by_owner[owners[rank]].append(i)
            groups = by_owner
        out: dict[int, R] = {}
        for addr, at in groups.items():
            conn = self._conn(addr)
            if conn is None:
                continue
            try:
                out.update(zip(at, op(conn, _pick(keys, at), at)))
            except (OSError, EmsError, ConnectionError):
                self._mark_down(addr)  # dead or hung: its keys are misses
        return out

    # -- batched operations ----------------------------------------------------------------------
    @overload
    def mget(self, keys: Sequence[Key], outs: None = None) -> list[bytearray | None]: ...

    @overload
    def mget(self, keys: Sequence[Key], outs: Sequence[object]) -> list[int | None]: ...

    def mget(self, keys: Sequence[Key], outs: Sequence[object] | None = None) -> list[Any]:
        """Values of many keys, one round trip per server. With ``outs`` each hit is written into
        the matching caller buffer and its byte count returned; misses are None."""
        return self._mget(keys, outs)

    def _mget(self, keys: Sequence[Key], outs: Sequence[object] | None) -> list[Any]:
        kb = _keys(keys)
        if outs is not None and len(outs) != len(kb):
            raise ValueError(f"mget got {len(kb)} keys but {len(outs)} output buffers")
        results: list[Any] = [None] * len(kb)
        pending: list[int] | None = None
        for rank in range(self.replicas):
            got = self._on_servers(kb, lambda c, ks, pos: c.get_many(ks, None if outs is None else _pick(outs, pos)),
                                   rank, pending)
            for i, r in got.items():
                results[i] = r
            pending = [i for i, r in enumerate(results) if r is None] if rank + 1 < self.replicas else []
            if not pending:
                break
        return results

    def mput(self, items: Sequence[tuple[Key, object]], *, strict: bool = True) -> list[bool]:
        """Store many ``(key, value)`` pairs (on every replica). True where at least one server
        stored it. With ``strict`` a refusal by a live server (quota, too large) raises
        :class:`EmsRefused` after the whole batch was tried."""
        kb = _keys([k for k, _ in items])
        values = [v for _, v in items]
        stored = [False] * len(kb)
        refusals: list[tuple[bytes, ErrorCode]] = []
        for rank in range(self.replicas):
            got = self._on_servers(kb, lambda c, ks, pos: c.put_many(ks, _pick(values, pos)), rank)
            for i, code in got.items():
                stored[i] |= code == ""
                if code:
                    refusals.append((kb[i], code))
        if strict and refusals:
            key, code = refusals[0]
            raise EmsRefused(code, f"EMS refused {len(refusals)} value(s) in namespace {self.namespace!r}, "
                                   f"first key {key!r}: {code}")
        return stored

    def mexists(self, keys: Sequence[Key]) -> list[bool]:
        """Presence of many keys (on any replica)."""
        kb = _keys(keys)
        found = [False] * len(kb)
        for rank in range(self.replicas):
            for i, r in self._on_servers(kb, lambda c, ks, pos: c.exists_many(ks), rank).items():
                found[i] |= bool(r)
        return found

    def mdelete(self, keys: Sequence[Key]) -> list[bool]:
        """Delete many keys from every replica; True where something was removed."""
        kb = _keys(keys)
        removed = [False] * len(kb)
        for rank in range(self.replicas):
            for i, r in self._on_servers(kb, lambda c, ks, pos: c.delete_many(ks), rank).items():
                removed[i] |= bool(r)
        return removed

    # -- single-key forms ------------------------------------------------------------------------
    def get(self, key: Key) -> bytearray | None:
        """The value of ``key`` or None."""
        return self.mget([key])[0]

    def get_into(self, key: Key, out: object) -> int | None:
        """Write the value of ``key`` into ``out``; its length, or None on a miss. A miss leaves
        ``out`` as it was, unless the value was replaced or removed while a same-host read copied
        it: then ``out`` may hold bytes of no value (the count returned is what to trust)."""
        return self.mget([key], [out])[0]

    def put(self, key: Key, value: object) -> bool:
        """Store ``value`` (bytes-like, numpy array or CPU tensor); False if no server took it."""
        return self.mput([(key, value)])[0]

    def exists(self, key: Key) -> bool:
        """Whether ``key`` is in the pool."""
        return self.mexists([key])[0]

    def delete(self, key: Key) -> bool:
        """Delete ``key``; True if something was removed."""
        return self.mdelete([key])[0]

    # -- async and background forms --------------------------------------------------------------
    async def aget(self, key: Key) -> bytearray | None:
        """Async :meth:`get`."""
        return await asyncio.to_thread(self.get, key)

    async def aget_into(self, key: Key, out: object) -> int | None:
        """Async :meth:`get_into`."""
        return await asyncio.to_thread(self.get_into, key, out)

    async def aput(self, key: Key, value: object) -> bool:
        """Async :meth:`put`."""
        return await asyncio.to_thread(self.put, key, value)

    @overload
    async def amget(self, keys: Sequence[Key], outs: None = None) -> list[bytearray | None]: ...

    @overload
    async def amget(self, keys: Sequence[Key], outs: Sequence[object]) -> list[int | None]: ...

    async def amget(self, keys: Sequence[Key], outs: Sequence[object] | None = None) -> list[Any]:
        """Async :meth:`mget`."""
        return await asyncio.to_thread(self._mget, keys, outs)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args)`` on the client's background thread (e.g. a KV store off the hot path)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ems-bg")
        return self._executor.submit(fn, *args, **kwargs)

    def release(self) -> None:
        """Drop this thread's same-host read leases now (they otherwise ride on the next request)."""
        for addr, conn in list(self._local.__dict__.get("conns", {}).items()):
            try:
                conn.release()
            except OSError:
                self._mark_down(addr)

    def close(self) -> None:
        """Close every connection of every thread and stop the background thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()
        self._local = threading.local()

    def __enter__(self) -> EmsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
