"""The shared index: where each DRAM value lives, published in the arena segment for same-host
reads that need no round trip to the server.

The server (:class:`IndexWriter`, always under its lock) keeps a table after the values in its
shared segment. A same-host client (:class:`IndexReader`) looks a key up there, copies the value
straight out of the arena and then checks that the slot did not change meanwhile: each slot is a
seqlock whose sequence number the server makes odd while rewriting it and bumps again when done.
The server rewrites (or empties) a key's slot *before* the store may free its block, so a reader
whose sequence number is unchanged after the copy copied bytes that were that key's value the whole
time. Any doubt (no slot, a slot being rewritten, a changed sequence) sends the read down the leased
RPC path, which pins; the table is only a cache of the store's index.

Recency needs no message either: a reader sets its slot's ``read`` word, and the server, about to
evict an entry whose ``read`` word is set, clears it and gives the entry a second chance (moves it
to the most recently used end) instead: LRU for RPC reads, CLOCK-style for index reads.

Layout, native-endian (x86: little-endian) u64 words: a header of ``HEADER_WORDS`` (magic, open
flag, slot count), then slots of ``SLOT_WORDS``: seq, tag_lo, tag_hi, offset, size, read. Slots
form buckets of ``WAYS``; a key lives in bucket ``tag_hi % buckets`` or nowhere. An empty slot has
tag 0 (real tags have bit 0 set). Only ``read`` is written by clients; it is outside the seqlock
and only ever a hint.

Keys are not stored: a slot names its key by a 127-bit tag, a BLAKE2b MAC of the key keyed with a
random per-namespace salt that the server hands out only to sessions it admitted to that namespace.
So a client resolves only its own namespace's keys, another namespace's names cannot even be
tested, and a false match needs a 2**-127 tag collision.

Memory ordering: readers rely on x86-64's total store order (loads are not reordered with loads,
stores not with stores, and stores become visible in causal order), as the Linux kernel's seqlocks
do on x86. The server's stores to a slot are ordered (seq odd, fields, seq even); the next bytes
written into a freed block come after the withdrawal in causal order (the server's own later
stores, or a client's stores after a ``Reserve`` reply). A reader loads seq, then the fields, then
the value (addressed by the fields), takes an uncontended lock (a locked instruction, a full
barrier, in case the copy used fast-string instructions) and loads seq again. CPython reads and
writes each aligned word with one 8-byte access, and so do numpy's gathers and scatters of the
``uint64`` view that batched reads use (:meth:`IndexReader.find_many`: one gather loads the whole
batch's sequence numbers, later ones the fields, so the order holds per slot). Other architectures
would need fences that Python cannot issue, so :data:`SUPPORTED` is False there and clients always
use RPC.
"""

from __future__ import annotations

import hashlib
import platform
import struct
from collections.abc import Sequence

import numpy as np

MAGIC = 0x31584449534D45  # "EMSIDX1" read as a little-endian integer
HEADER_WORDS = 8  # one cache line
SLOT_WORDS = 6  # seq, tag_lo, tag_hi, offset, size, read
WAYS = 4
BYTES_PER_SLOT = 8 << 10  # one slot per 8 KiB of arena (values are usually KV blocks or tensors)
MIN_SLOTS, MAX_SLOTS = 1 << 10, 1 << 22
SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")
_TAG = struct.Struct("<QQ")


def slots_for(capacity: int) -> int:
    """Slot count for an arena of ``capacity`` bytes: a power of two within the limits."""
    want = min(max(capacity // BYTES_PER_SLOT, MIN_SLOTS), MAX_SLOTS)
    return 1 << (want.bit_length() - 1)


def index_bytes(slots: int) -> int:
    """Bytes taken by a table of ``slots`` slots, header included."""
    return (HEADER_WORDS + slots * SLOT_WORDS) * 8


def key_tag(salt: bytes, key: bytes) -> tuple[int, int]:
    """The ``(tag_lo, tag_hi)`` naming ``key`` in the namespace whose salt is ``salt``."""
    lo, hi = _TAG.unpack(hashlib.blake2b(key, digest_size=16, key=salt).digest())
    return lo | 1, hi


def key_tags(salt: bytes, keys: Sequence[bytes]) -> np.ndarray:
    """The tags of many keys as a ``(len(keys), 2)`` array of ``(tag_lo, tag_hi)``, as :func:`key_tag`
    gives them (copying one keyed state per key costs less than keying a new hash each time)."""
    keyed = hashlib.blake2b(digest_size=16, key=salt)
    digests = bytearray()
    for key in keys:
        h = keyed.copy()
        h.update(key)
        digests += h.digest()
    tags = np.frombuffer(digests, "<u8").reshape(len(keys), 2).astype(np.uint64)
    tags[:, 0] |= np.uint64(1)
    return tags


class IndexWriter:
    """The server's side: publishes and withdraws slots (callers hold the service lock)."""

    def __init__(self, view: memoryview, slots: int) -> None:
        if slots % WAYS or len(view) < index_bytes(slots):
            raise ValueError(f"index of {slots} slots does not fit a {len(view)}-byte region in buckets of {WAYS}")
        self.words = view[:index_bytes(slots)].cast("Q")
        self.buckets = slots // WAYS
        self._slot_of: dict[tuple[str, bytes], int] = {}
        self._owner: dict[int, tuple[str, bytes]] = {}
        self._victim = 0  # round-robin way replaced when a bucket is full
        self.words[0], self.words[1], self.words[2] = MAGIC, 1, slots

    def publish(self, ns: str, key: bytes, tag: tuple[int, int], offset: int, size: int) -> None:
        """Point ``(ns, key)`` at a filled block (its bytes must be in place before this call)."""
        slot = self._slot_of.get((ns, key))
        if slot is None:
            base = (tag[1] % self.buckets) * WAYS
            slot = next((s for s in range(base, base + WAYS) if s not in self._owner), None)
            if slot is None:  # bucket full: that key is read by RPC from now on
                slot = base + self._victim % WAYS
                self._victim += 1
                del self._slot_of[self._owner[slot]]
            self._owner[slot] = (ns, key)
            self._slot_of[(ns, key)] = slot
        self._write(slot, tag[0], tag[1], offset, size)

    def withdraw(self, ns: str, key: bytes) -> None:
        """Empty ``(ns, key)``'s slot; must precede any reuse of the block it pointed at."""
        slot = self._slot_of.pop((ns, key), None)
        if slot is not None:
            del self._owner[slot]
            self._write(slot, 0, 0, 0, 0)

    def is_published(self, ns: str, key: bytes) -> bool:
        """Whether ``(ns, key)`` has a slot."""
        return (ns, key) in self._slot_of

    def take_read(self, ns: str, key: bytes) -> bool:
        """Whether a client read ``(ns, key)`` through the index since the last call (clears the mark)."""
        slot = self._slot_of.get((ns, key))
        if slot is None:
            return False
        w = HEADER_WORDS + slot * SLOT_WORDS + 5
        if not self.words[w]:
            return False
        self.words[w] = 0
        return True

    def close(self) -> None:
        """Tell readers the server is gone (they fall back to RPC, which then fails)."""
        self.words[1] = 0

    def _write(self, slot: int, tag_lo: int, tag_hi: int, offset: int, size: int) -> None:
        w = HEADER_WORDS + slot * SLOT_WORDS
        seq = self.words[w]
        self.words[w] = seq + 1  # odd: a reader that already holds seq will fail its check
        self.words[w + 1], self.words[w + 2], self.words[w + 3], self.words[w + 4] = tag_lo, tag_hi, offset, size
        self.words[w + 5] = 0
        self.words[w] = seq + 2


class IndexReader:
    """A same-host client's side: optimistic lookups validated after the copy."""

    def __init__(self, view: memoryview, slots: int, capacity: int) -> None:
        self.words = view[:index_bytes(slots)].cast("Q")
        if self.words[0] != MAGIC or self.words[2] != slots:
            raise ValueError(f"no EMS index of {slots} slots in the shared segment (header {list(self.words[:3])})")
        self.buckets = slots // WAYS
        self.capacity = capacity
        self.flat = np.frombuffer(self.words, np.uint64)  # the same words, for lookups of many keys
        self._buckets = np.uint64(self.buckets)
        self._ways = HEADER_WORDS + np.arange(0, WAYS * SLOT_WORDS, SLOT_WORDS, dtype=np.intp)

    def is_open(self) -> bool:
        """False once the server has shut down."""
        return self.words[1] == 1

    def find(self, tag: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """``(word, seq, offset, size)`` of the slot holding ``tag``, or None.

        The sequence number is read before the fields, so :meth:`unchanged` after the copy
        vouches for the fields and for the bytes they point at.
        """
        lo, hi = tag
        w = self.words
        base = HEADER_WORDS + (hi % self.buckets) * WAYS * SLOT_WORDS
        for s in range(base, base + WAYS * SLOT_WORDS, SLOT_WORDS):
            seq = w[s]
            if seq & 1 or w[s + 1] != lo or w[s + 2] != hi:
                continue
            offset, size = w[s + 3], w[s + 4]
            if offset + size > self.capacity:  # cannot happen unless the segment is corrupt
                return None
            return s, seq, offset, size
        return None

    def unchanged(self, word: int, seq: int) -> bool:
        """Whether the slot at ``word`` still holds sequence number ``seq``."""
        return self.words[word] == seq

    def mark_read(self, word: int) -> None:
        """Tell the server's eviction that the slot at ``word`` was read (written only when clear,
        so hot slots' cache lines are not bounced between cores)."""
        if not self.words[word + 5]:
            self.words[word + 5] = 1

    def find_many(self, tags: np.ndarray) -> tuple[np.ndarray, ...]:
        """:meth:`find` for the ``(n, 2)`` array ``tags`` at once: ``(rows, words, seqs, offsets,
        sizes)`` for the rows of ``tags`` that have a slot (arrays in row order).

        Keeps :meth:`find`'s order in bulk: every probed slot's sequence number is loaded (one
        numpy gather) before any of its fields (later gathers), so :meth:`unchanged_many` after the
        copies vouches for them as for a single read.
        """
        w = self.flat
        bucket = (tags[:, 1] % self._buckets).astype(np.intp)
        probe = bucket[:, None] * (WAYS * SLOT_WORDS) + self._ways  # (n, WAYS) slot words
        seqs = w[probe]  # first: the sequence numbers
        match = (w[probe + 2] == tags[:, 1:]) & (w[probe + 1] == tags[:, :1]) & ((seqs & 1) == 0)
        rows = np.flatnonzero(match.any(axis=1))
        way = match[rows].argmax(axis=1)  # the first matching way, as find() takes
        words, seqs = probe[rows, way], seqs[rows, way]
        offsets, sizes = w[words + 3], w[words + 4]
        sane = (sizes <= self.capacity) & (offsets <= self.capacity - sizes)  # else a corrupt segment
        if not sane.all():
            rows, words, seqs, offsets, sizes = rows[sane], words[sane], seqs[sane], offsets[sane], sizes[sane]
        return rows, words, seqs, offsets, sizes

    def unchanged_many(self, words: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        """:meth:`unchanged` for many slots: a bool per slot."""
        return self.flat[words] == seqs

    def mark_read_many(self, words: np.ndarray) -> None:
        """:meth:`mark_read` for many slots (again only those not yet marked)."""
        reads = words + 5
        self.flat[reads[self.flat[reads] == 0]] = 1
