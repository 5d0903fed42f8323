"""The DRAM tier's index: entries in the arena, LRU order, namespace quotas and pins.

Pure policy over an :class:`~matrixinfer.ems.arena.Allocator`: it decides where values go and which
ones leave, and tells its owner about each eviction (so the owner can spill it to SSD) while the
entry's bytes are still in place. It touches no memory and does no I/O itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from matrixinfer.ems.arena import Allocator, align_up
from matrixinfer.ems.protocol import ErrorCode


class EmsStoreError(Exception):
    """Base class of store refusals; ``code`` travels on the wire."""

    code: ClassVar[ErrorCode] = ErrorCode.ERROR


class QuotaExceeded(EmsStoreError):
    """A value is larger than its namespace's whole quota."""

    code = ErrorCode.QUOTA


class ValueTooLarge(EmsStoreError):
    """A value is larger than the whole arena."""

    code = ErrorCode.TOO_LARGE


class BadSize(EmsStoreError):
    """A size that is not a non-negative integer (a malformed request, never stored)."""

    code = ErrorCode.BAD_REQUEST


class ArenaFull(EmsStoreError):
    """Nothing more can be evicted (everything left is pinned or being written)."""

    code = ErrorCode.FULL


@dataclass(eq=False)
class Entry:
    """One value in the arena. ``pins`` counts readers copying it; a dead entry is freed at 0 pins."""

    ns: str
    key: bytes
    offset: int
    size: int
    pins: int = 0
    dead: bool = False
    on_ssd: bool = False  # an identical copy is already on the SSD tier, so eviction needs no write


class DramStore:
    """LRU cache of variable-length values in an arena, with per-namespace quotas and pins.

    ``quota_of(ns)`` gives a namespace's byte limit (aligned bytes, reservations included). A put
    over quota first evicts the namespace's own least-recently-used entries; a put that finds no
    free block evicts the globally least-recently-used unpinned entries. ``on_evict(entry)`` is
    called before an evicted entry's block is freed. ``on_link(entry)`` runs when an entry becomes
    its key's value, ``on_unlink(entry)`` when it stops being it (replaced, deleted or evicted),
    always before its block can be freed: the server mirrors the index into shared memory there.
    ``was_read(entry)`` says (and forgets) whether the entry was read without the store knowing
    (through that shared index) since last asked: such an entry gets a second chance instead of
    being evicted. ``may_evict(ns, entry)`` says whether a put into ``ns`` may evict ``entry`` to
    make room (the server keeps undeclared namespaces from evicting declared ones).
    """

    def __init__(self, capacity: int, quota_of: Callable[[str], int],
                 on_evict: Callable[[Entry], None] | None = None,
                 on_link: Callable[[Entry], None] | None = None,
                 on_unlink: Callable[[Entry], None] | None = None,
                 was_read: Callable[[Entry], bool] | None = None,
                 may_evict: Callable[[str, Entry], bool] | None = None) -> None:
        self.alloc = Allocator(capacity)
        self.quota_of = quota_of
        self.on_evict = on_evict or (lambda entry: None)
        self.on_link = on_link or (lambda entry: None)
        self.on_unlink = on_unlink or (lambda entry: None)
        self.was_read = was_read or (lambda entry: False)
        self.may_evict = may_evict or (lambda ns, entry: True)
        self.lru: OrderedDict[tuple[str, bytes], Entry] = OrderedDict()  # oldest first
        self.ns_lru: dict[str, OrderedDict[bytes, Entry]] = {}
        self.ns_bytes: dict[str, int] = {}  # aligned bytes held: live, dead-but-pinned, reserved

    # -- reading ---------------------------------------------------------------------------------
    def get(self, ns: str, key: bytes, pin: bool = False, touch: bool = True) -> Entry | None:
        """The live entry for ``(ns, key)``; marks it most recently used and optionally pins it."""
        entry = self.lru.get((ns, key))
        if entry is None:
            return None
        if touch:
            self.lru.move_to_end((ns, key))
            self.ns_lru[ns].move_to_end(key)
        if pin:
            entry.pins += 1
        return entry

    def unpin(self, entry: Entry) -> None:
        """Drop one pin; frees the block of an entry that was replaced or deleted meanwhile."""
        if entry.pins <= 0:
            raise RuntimeError(f"unpin of unpinned entry {entry.ns}/{entry.key!r}")
        entry.pins -= 1
        if entry.dead and entry.pins == 0:
            self._free(entry.ns, entry.offset)

    # -- writing ---------------------------------------------------------------------------------
    def reserve(self, ns: str, size: int) -> int:
        """Offset of a private block for a value of ``size`` bytes, evicting as needed.

        The block counts against ``ns``'s quota until :meth:`commit` or :meth:`abort`.
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadSize(f"value size {size!r} is not a non-negative integer")
        need = align_up(size)
        quota = self.quota_of(ns)
        if not self.alloc.fits(size):
            raise ValueTooLarge(f"value of {size} bytes exceeds the arena's {self.alloc.capacity} bytes")
        if need > quota:
            raise QuotaExceeded(f"value of {size} bytes exceeds namespace {ns!r}'s quota of {quota} bytes")
        while self.ns_bytes.get(ns, 0) + need > quota:
            if not self._evict_one(self.ns_lru.get(ns)):
                raise QuotaExceeded(f"namespace {ns!r} is at its quota of {quota} bytes and the rest is pinned")
        while (offset := self.alloc.alloc(size)) is None:
            if not self._evict_one(None, ns):
                raise ArenaFull(f"no free block of {need} bytes and every entry namespace {ns!r} may evict is "
                                f"pinned or reserved ({self.alloc.used_bytes}/{self.alloc.capacity} bytes used)")
        self.ns_bytes[ns] = self.ns_bytes.get(ns, 0) + need
        return offset

    def abort(self, ns: str, offset: int) -> None:
        """Give back a reservation that will not be committed."""
        self._free(ns, offset)

    def commit(self, ns: str, key: bytes, offset: int, size: int, on_ssd: bool = False) -> Entry:
        """Publish a filled reservation as the value of ``(ns, key)``, replacing any older value."""
        self.delete(ns, key)
        entry = Entry(ns, key, offset, size, on_ssd=on_ssd)
        self.lru[(ns, key)] = entry
        self.ns_lru.setdefault(ns, OrderedDict())[key] = entry
        self.on_link(entry)
        return entry

    def delete(self, ns: str, key: bytes) -> bool:
        """Remove ``(ns, key)``; its block is freed now or when its last reader unpins it."""
        entry = self.lru.pop((ns, key), None)
        if entry is None:
            return False
        del self.ns_lru[ns][key]
        self.on_unlink(entry)
        if entry.pins:
            entry.dead = True
        else:
            self._free(ns, entry.offset)
        return True

    # -- internals -------------------------------------------------------------------------------
    def _evict_one(self, order: OrderedDict | None, for_ns: str | None = None) -> bool:
        """Evict the least-recently-used unpinned entry of ``order`` (global LRU when None) that a
        put into ``for_ns`` may evict."""
        items = self.lru.values() if order is None else order.values()
        chances = len(items)  # bounded: readers may mark entries again while we go round
        while True:
            victim = next((e for e in items if e.pins == 0 and (for_ns is None or self.may_evict(for_ns, e))), None)
            if victim is None:
                return False
            if chances == 0 or not self.was_read(victim):
                break
            chances -= 1
            self.get(victim.ns, victim.key)  # read since it was last used: second chance
        self.on_evict(victim)
        self.delete(victim.ns, victim.key)
        return True

    def _free(self, ns: str, offset: int) -> None:
        self.ns_bytes[ns] -= self.alloc.block_size(offset)
        self.alloc.free(offset)

    def used_by(self, ns: str) -> tuple[int, int]:
        """``(bytes, entries)`` held by ``ns``."""
        return self.ns_bytes.get(ns, 0), len(self.ns_lru.get(ns, ()))

    def keys_in_order(self, ns: str) -> list[bytes]:
        """``ns``'s keys from least to most recently used (for tests and debugging)."""
        return list(self.ns_lru.get(ns, ()))
