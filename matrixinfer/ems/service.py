"""One EMS server's state: the DRAM arena and store, the SSD tier, namespaces, leases and counters.

Socket-free: :mod:`matrixinfer.ems.server` calls these methods with one lock held for index
changes only; value bytes move outside the lock, protected by pins (readers) or reservations
(writers).
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from matrixinfer.ems.arena import SharedArena
from matrixinfer.ems.config import EmsServerConfig, NamespaceConfig
from matrixinfer.ems.index import IndexWriter, index_bytes, key_tag, slots_for
from matrixinfer.ems.protocol import ErrorCode
from matrixinfer.ems.ssd import SsdTier
from matrixinfer.ems.store import BadSize, DramStore, EmsStoreError, Entry

LEASE_SECONDS = 30.0  # a reader that has not released by then is presumed dead
MAX_NAMESPACE = 256  # bytes of a namespace name
MAX_NAMESPACES = 4096  # distinct namespaces a server keeps state for (salts, counters)
COUNTERS = ("puts", "put_bytes", "hits", "dram_hits", "ssd_hits", "misses", "evictions", "spills",
            "promotions", "corrupt")


class NamespaceRefused(Exception):
    """A session asked for a namespace it may not open."""


def host_id() -> str:
    """Identity of this host *and* network namespace: same-host fast path only when equal."""
    parts = []
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            pass
    try:
        parts.append(str(os.stat("/proc/self/ns/net").st_ino))
    except OSError:
        pass
    return "/".join(parts) or "unknown"


@dataclass
class Session:
    """Per-connection state: its namespace, open read leases and write reservations."""

    namespace: str = ""
    maps_arena: bool = False  # was handed the arena's descriptor: can read every byte of it anyway
    leases: dict[int, list[Entry | bytearray | None]] = field(default_factory=dict)
    reservations: dict[int, list[tuple[bytes, int, int]]] = field(default_factory=dict)


class EmsService:
    """The server's state machine; see the module docstring for the locking rule."""

    def __init__(self, capacity: int, ssd_dir: str | None = None, ssd_capacity: int = 0,
                 namespaces: Mapping[str, NamespaceConfig] | None = None, open_namespaces: bool = True,
                 default_quota: int | None = None, shared: bool = True) -> None:
        self.lock = threading.RLock()
        self.namespaces = dict(namespaces or {})
        self.open_namespaces = open_namespaces
        # undeclared namespaces share what the declared ones do not reserve, and never evict them
        declared = sum(cfg.quota for cfg in self.namespaces.values())
        self.default_quota = default_quota if default_quota is not None else max(0, capacity - declared)
        self.index_slots = slots_for(capacity) if shared else 0
        self.arena = SharedArena(capacity, extra=index_bytes(self.index_slots)) if shared else None
        self.view = self.arena.view if self.arena else memoryview(bytearray(capacity))
        self.index = IndexWriter(self.arena.extra_view, self.index_slots) if self.arena else None
        self._salts: dict[str, bytes] = {}  # namespace -> key of its index tags, only for its sessions
        self.store = DramStore(capacity, self.quota_of, self._spill, on_link=self._publish,
                               on_unlink=self._withdraw, was_read=self._was_read, may_evict=self._may_evict)
        self._bytes = np.frombuffer(self.view, dtype=np.uint8)  # for zeroing reserved blocks
        self.ssd = SsdTier(ssd_dir, ssd_capacity) if ssd_dir and ssd_capacity > 0 else None
        self.server_id = secrets.token_hex(8)
        self.host_id = host_id()
        self.counters: dict[str, Counter] = {}
        self._ids = itertools.count(1)
        self._lease_deadlines: dict[int, tuple[float, Session]] = {}

    @classmethod
    def from_config(cls, cfg: EmsServerConfig) -> EmsService:
        """The service of one server process's settings."""
        return cls(cfg.capacity, cfg.ssd_dir, cfg.ssd_capacity, cfg.namespaces, open_namespaces=not cfg.closed,
                   default_quota=cfg.default_quota)

    # -- namespaces ------------------------------------------------------------------------------
    def quota_of(self, ns: str) -> int:
        """Byte quota of ``ns`` in DRAM."""
        cfg = self.namespaces.get(ns)
        return cfg.quota if cfg else self.default_quota

    def open(self, session: Session, ns: str, token: str) -> None:
        """Bind ``session`` to ``ns`` or raise :class:`NamespaceRefused`."""
        if not ns or len(ns.encode(errors="surrogatepass")) > MAX_NAMESPACE:
            raise NamespaceRefused(f"a namespace name must have 1 to {MAX_NAMESPACE} bytes, got {len(ns)} characters")
        cfg = self.namespaces.get(ns)
        if cfg is None and not self.open_namespaces:
            raise NamespaceRefused(f"namespace {ns!r} is not declared on this server")
        if cfg is not None and cfg.token and not secrets.compare_digest(cfg.token.encode(), token.encode(
                errors="surrogatepass")):
            raise NamespaceRefused(f"namespace {ns!r} refused: wrong or missing token")
        with self.lock:
            if ns not in self._salts and len(self._salts) >= MAX_NAMESPACES:
                raise NamespaceRefused(f"namespace {ns!r} refused: this server already holds {MAX_NAMESPACES} "
                                       f"namespaces")
            self.salt_of(ns)
        session.namespace = ns

    def salt_of(self, ns: str) -> bytes:
        """The key of ``ns``'s index tags (given to sessions admitted to ``ns`` only)."""
        with self.lock:
            return self._salts.setdefault(ns, secrets.token_bytes(16))

    def _publish(self, entry: Entry) -> None:
        if self.index:
            self.index.publish(entry.ns, entry.key, key_tag(self.salt_of(entry.ns), entry.key),
                               entry.offset, entry.size)

    def _withdraw(self, entry: Entry) -> None:
        if self.index:
            self.index.withdraw(entry.ns, entry.key)

    def _may_evict(self, ns: str, entry: Entry) -> bool:
        """A declared namespace may evict anything; an undeclared one only undeclared entries."""
        return ns in self.namespaces or entry.ns not in self.namespaces

    def _was_read(self, entry: Entry) -> bool:
        return self.index is not None and self.index.take_read(entry.ns, entry.key)

    def _count(self, ns: str, **deltas: int) -> None:
        self.counters.setdefault(ns, Counter()).update(deltas)

    # -- eviction and promotion ------------------------------------------------------------------
    def _spill(self, entry: Entry) -> None:
        self._count(entry.ns, evictions=1)
        if self.ssd is None or entry.on_ssd:
            return
        data = self.view[entry.offset:entry.offset + entry.size]
        if self.ssd.put(entry.ns, entry.key, data):
            self._count(entry.ns, spills=1)

    def _promote(self, ns: str, key: bytes) -> Entry | bytearray | None:
        """Bring an SSD-resident value back into DRAM (lock held); None when unreadable.

        When DRAM cannot take it (e.g. the rest of the same batch is pinned) the value is read into
        a private buffer instead and served from there.
        """
        ssd = self.ssd
        size = ssd.size_of(ns, key) if ssd else None
        if ssd is None or size is None:
            return None
        ssd.protected.add((ns, key))
        try:
            offset = self.store.reserve(ns, size)
        except EmsStoreError:
            buf = bytearray(size)
            return buf if ssd.read_into(ns, key, memoryview(buf)) else None
        finally:
            ssd.protected.discard((ns, key))
        if not ssd.read_into(ns, key, self.view[offset:offset + size]):
            self.store.abort(ns, offset)
            self._count(ns, corrupt=1)
            return None
        self._count(ns, promotions=1)
        return self.store.commit(ns, key, offset, size, on_ssd=True)

    # -- reads -----------------------------------------------------------------------------------
    def lookup(self, session: Session, keys: list[bytes]) -> list[Entry | bytearray | None]:
        """Pin and return the entries of ``keys``, promoting SSD hits (a bytearray when one could not
        be promoted); the caller must :meth:`unpin` them."""
        ns = session.namespace
        out: list[Entry | bytearray | None] = []
        with self.lock:
            for key in keys:
                entry: Entry | bytearray | None = self.store.get(ns, key, pin=True)
                if isinstance(entry, Entry):
                    self._count(ns, hits=1, dram_hits=1)
                    if self.index and not self.index.is_published(ns, key):
                        self._publish(entry)  # lost its slot to a bucket neighbour: hot again
                elif (entry := self._promote(ns, key)) is not None:
                    if isinstance(entry, Entry):
                        entry.pins += 1
                    self._count(ns, hits=1, ssd_hits=1)
                else:
                    self._count(ns, misses=1)
                out.append(entry)
        return out

    def count_index_hits(self, session: Session, count: int) -> None:
        """Count same-host reads served from the shared index (their recency is in the index)."""
        count = min(max(count, 0), 1 << 32)  # a client's report, not to be trusted with the counters' sign
        with self.lock:
            self._count(session.namespace, hits=count, dram_hits=count)

    def unpin(self, entries: list[Entry | bytearray | None]) -> None:
        """Release pins taken by :meth:`lookup`."""
        with self.lock:
            for entry in entries:
                if isinstance(entry, Entry):
                    self.store.unpin(entry)

    def lease(self, session: Session, entries: list[Entry | bytearray | None]) -> int:
        """Keep ``entries`` pinned under a lease id until released or expired."""
        lease_id = next(self._ids)
        with self.lock:
            session.leases[lease_id] = entries
            self._lease_deadlines[lease_id] = (time.monotonic() + LEASE_SECONDS, session)
        return lease_id

    def release(self, session: Session, lease_id: int) -> None:
        """Drop a read lease (unknown ids are ignored: it may have expired)."""
        with self.lock:
            entries = session.leases.pop(lease_id, None)
            self._lease_deadlines.pop(lease_id, None)
            if entries:
                self.unpin(entries)

    def expire_leases(self, now: float | None = None) -> int:
        """Release leases past their deadline; returns how many."""
        now = time.monotonic() if now is None else now
        with self.lock:
            expired = [(lid, s) for lid, (t, s) in self._lease_deadlines.items() if t < now]
            for lease_id, session in expired:
                self.release(session, lease_id)
        return len(expired)

    def exists(self, session: Session, keys: list[bytes]) -> list[bool]:
        """Presence in either tier, without changing recency."""
        ns = session.namespace
        with self.lock:
            return [self.store.get(ns, k, touch=False) is not None or bool(self.ssd and self.ssd.contains(ns, k))
                    for k in keys]

    # -- writes ----------------------------------------------------------------------------------
    def reserve(self, session: Session, size: int) -> int:
        """Arena offset for a new value of ``size`` bytes (raises an EmsStoreError subclass)."""
        with self.lock:
            return self.store.reserve(session.namespace, size)

    def abort(self, session: Session, offset: int) -> None:
        """Drop an uncommitted reservation."""
        with self.lock:
            self.store.abort(session.namespace, offset)

    def commit(self, session: Session, key: bytes, offset: int, size: int) -> None:
        """Publish a filled reservation; an older value (and its SSD copy) is dropped first."""
        ns = session.namespace
        with self.lock:
            if self.ssd:
                self.ssd.delete(ns, key)  # an SSD copy of the old value must never resurface
            self.store.commit(ns, key, offset, size)
            self._count(ns, puts=1, put_bytes=size)

    def reserve_many(self, session: Session, keys: list[bytes],
                     sizes: list[int]) -> tuple[int, list[int], list[ErrorCode]]:
        """Same-host put: reservations for several keys under one id.

        Reservations cannot be evicted, so once one fails the rest are answered ``RETRY``: the
        client commits what it got and asks again for the remainder. A commit publishes exactly
        the reserved extent, and a block is zeroed before a session that cannot read the arena
        itself gets it, so committing it unwritten publishes zeros, never bytes a freed value (of
        any namespace) left there. A session holding the arena's descriptor could read those bytes
        directly, so its blocks are not zeroed (a same-host put stays one copy).
        """
        offsets: list[int] = []
        codes: list[ErrorCode] = []
        held: list[tuple[bytes, int, int]] = []
        for key, size in zip(keys, sizes):
            if codes and codes[-1] == ErrorCode.RETRY:
                offsets.append(-1)
                codes.append(ErrorCode.RETRY)
                continue
            try:
                off = self.reserve(session, size)
            except BadSize:
                offsets.append(-1)
                codes.append(ErrorCode.BAD_REQUEST)
                continue
            except EmsStoreError as exc:
                offsets.append(-1)
                # our own uncommitted blocks may be what is in the way: commit them, then retry
                codes.append(ErrorCode.RETRY if held else exc.code)
                continue
            if not session.maps_arena:
                self._bytes[off:off + size] = 0  # outside the lock: the block is this reservation's alone
            offsets.append(off)
            codes.append(ErrorCode.OK)
            held.append((key, off, size))
        rid = next(self._ids)
        session.reservations[rid] = held
        return rid, offsets, codes

    def commit_many(self, session: Session, rid: int, abort: bool = False) -> None:
        """Publish or drop every block of reservation ``rid``."""
        for key, off, size in session.reservations.pop(rid, []):
            if abort:
                self.abort(session, off)
            else:
                self.commit(session, key, off, size)

    def delete(self, session: Session, keys: list[bytes]) -> list[bool]:
        """Remove ``keys`` from both tiers of the session's namespace."""
        ns = session.namespace
        with self.lock:
            return [self.store.delete(ns, k) | bool(self.ssd and self.ssd.delete(ns, k)) for k in keys]

    def close(self, session: Session) -> None:
        """A connection ended: release its leases and reservations."""
        for lease_id in list(session.leases):
            self.release(session, lease_id)
        for rid in list(session.reservations):
            self.commit_many(session, rid, abort=True)

    # -- stats -----------------------------------------------------------------------------------
    def stats(self, viewer: str | None = None) -> dict:
        """Usage and counters for the whole server and each namespace. ``viewer`` is the namespace
        of the session asking: a namespace with a token is shown only to its own sessions (None:
        every namespace, for in-process use)."""
        with self.lock:
            names = set(self.counters) | set(self.store.ns_lru) | (set(self.ssd.ns_bytes) if self.ssd else set())
            per_ns = {}
            for ns in sorted(names):
                cfg = self.namespaces.get(ns)
                if viewer is not None and ns != viewer and cfg is not None and cfg.token:
                    continue
                c = self.counters.get(ns, Counter())
                dram_bytes, dram_entries = self.store.used_by(ns)
                ssd_bytes, ssd_entries = self.ssd.used_by(ns) if self.ssd else (0, 0)
                per_ns[ns] = {"quota": self.quota_of(ns), "dram_bytes": dram_bytes, "dram_entries": dram_entries,
                              "ssd_bytes": ssd_bytes, "ssd_entries": ssd_entries, **{k: c[k] for k in COUNTERS}}
            return {"server_id": self.server_id, "capacity": self.store.alloc.capacity,
                    "dram_used": self.store.alloc.used_bytes,
                    "ssd_capacity": self.ssd.capacity if self.ssd else 0, "ssd_used": self.ssd.used if self.ssd else 0,
                    "leases": len(self._lease_deadlines), "namespaces": per_ns}

    def shutdown(self) -> None:
        """Release the shared segment (mapped clients keep their view until they unmap)."""
        if self.index:
            self.index.close()
        if self.arena:
            self.arena.close()
