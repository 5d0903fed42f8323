"""Same-host reads through the shared index: copy what the index vouches for straight out of the
mapped arena into the caller's buffers, then check that it still vouches for it.

:meth:`LocalReader.read_each` looks keys up one at a time; :meth:`LocalReader.read_batch` does the
same loads in the same order for a whole batch with array operations (bucket probes, validation,
read marks) and computes the tags and copies the values with one call each of the C helpers
(:mod:`matrixinfer.ems.native`; hashlib and a Python loop without them), so no Python loop runs
per key. Both return the positions the index could not serve (no slot, a slot being rewritten, a
buffer too small, a value changed during its copy); the connection reads those through the leased
path. See :mod:`matrixinfer.ems.index` for why an unchanged sequence number after the copy vouches
for the copied bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter
from typing import Any

import numpy as np

from matrixinfer.ems import native
from matrixinfer.ems.index import IndexReader, key_tag, key_tags

PARALLEL_COPY_MIN = 32 << 20  # gets at least this large copy their large values on several threads
PARALLEL_VALUE_MIN = 1 << 20  # smaller values are copied in line: a thread hand-off costs more
COPY_CHUNK = 16 << 20
BATCH_MIN = 32  # gets of at least this many keys use read_batch (its array set-up costs ~40 us)
_BYTE_VIEW = attrgetter("readonly", "format", "ndim")
_as_view: Callable[[Any], memoryview] = memoryview  # map() over any objects, typed
_copy_pool: ThreadPoolExecutor | None = None


def writable_view(buf: Any) -> memoryview:
    """A flat byte view of a caller buffer (bytearray, numpy array, CPU torch tensor, memoryview);
    any object is tried, hence ``Any``."""
    try:
        view = memoryview(buf)
    except TypeError:
        if not hasattr(buf, "numpy"):
            raise TypeError(f"cannot write into {type(buf).__name__}: it exposes no buffer") from None
        view = memoryview(buf.numpy())  # CPU torch tensors share memory with .numpy()
    if view.readonly:
        raise TypeError(f"cannot write into a read-only {type(buf).__name__}")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def writable_views(bufs: Sequence[Any]) -> list[memoryview]:
    """:func:`writable_view` of each buffer, the common case (writable 1-D byte buffers, e.g.
    uint8 arrays) recognised for the whole list at once."""
    try:
        views = list(map(_as_view, bufs))
    except TypeError:
        return [writable_view(b) for b in bufs]
    return views if set(map(_BYTE_VIEW, views)) <= {(False, "B", 1)} else [writable_view(b) for b in bufs]


def parallel_copy(pairs: list[tuple[memoryview, memoryview]]) -> None:
    """Copy ``src`` into ``dst`` for each pair, split in chunks over a few threads: fresh
    destination memory (a new model's parameters) is bound by page faults, which cores take in
    parallel (about 1.6x over one thread here); numpy releases the GIL while copying."""
    global _copy_pool
    if _copy_pool is None:
        _copy_pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="ems-copy")
    jobs = []
    for dst, src in pairs:
        d, s_ = np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8)
        jobs += [(d[i:i + COPY_CHUNK], s_[i:i + COPY_CHUNK]) for i in range(0, len(d), COPY_CHUNK)]
    for f in [_copy_pool.submit(np.copyto, d, s_) for d, s_ in jobs]:
        f.result()


def copy_pairs(pairs: list[tuple[memoryview, memoryview]], nbytes: int) -> None:
    """Copy each ``(dst, src)`` pair of equal lengths (``nbytes`` in all), large values on threads
    when there are enough bytes of them."""
    if nbytes >= PARALLEL_COPY_MIN:
        big = [(d, s) for d, s in pairs if len(d) >= PARALLEL_VALUE_MIN]
        if sum(len(d) for d, _ in big) >= PARALLEL_COPY_MIN:
            parallel_copy(big)
            pairs = [(d, s) for d, s in pairs if len(d) < PARALLEL_VALUE_MIN]
    for d, src in pairs:
        d[:] = src


class LocalReader:
    """Reads of one server's arena through its shared index, for one connection (not thread-safe)."""

    def __init__(self, index: IndexReader, arena: memoryview, salt: bytes) -> None:
        self.index, self.arena, self.salt = index, arena, salt
        self.fence = threading.Lock()  # taking it is a locked instruction: a full barrier on x86
        self._base: int | None = None  # the arena's address, for the C helper

    def read(self, keys: list[bytes], outs: Sequence[object] | None,
             results: list[object]) -> tuple[list[int], int, int]:
        """Serve what the index vouches for into ``outs`` (byte counts in ``results``) or, without
        ``outs``, as new bytearrays in ``results``: ``(positions left to the leased path, keys
        served, conflicts)``."""
        if outs is not None and len(outs) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(outs)} output buffers")
        return (self.read_batch if len(keys) >= BATCH_MIN else self.read_each)(keys, outs, results)

    def read_each(self, keys: list[bytes], outs: Sequence[object] | None,
                  results: list[object]) -> tuple[list[int], int, int]:
        """:meth:`read` one key at a time."""
        index, arena = self.index, self.arena
        views = None if outs is None else [writable_view(o) for o in outs]
        rest: list[int] = []
        hits: list[tuple[int, int, int, int]] = []  # (position, slot word, seq, size)
        pairs: list[tuple[memoryview, memoryview]] = []
        nbytes = 0
        for i, key in enumerate(keys):
            found = index.find(key_tag(self.salt, key))
            if found is None or (views is not None and len(views[i]) < found[3]):
                rest.append(i)  # not indexed, or a buffer too small: the leased path reports it
                continue
            word, seq, off, size = found
            if views is None:
                results[i] = bytearray(arena[off:off + size])
            else:
                pairs.append((views[i][:size], arena[off:off + size]))
                nbytes += size
            hits.append((i, word, seq, size))
        copy_pairs(pairs, nbytes)
        with self.fence:  # the copies' loads are done before the validating loads, string ops too
            pass
        conflicts = 0
        for i, word, seq, size in hits:
            if index.unchanged(word, seq):
                if views is not None:
                    results[i] = size
                index.mark_read(word)
            else:  # rewritten or withdrawn while we copied: the bytes may be torn
                results[i] = None
                rest.append(i)
                conflicts += 1
        if conflicts:
            rest.sort()
        return rest, len(hits) - conflicts, conflicts

    def read_batch(self, keys: list[bytes], outs: Sequence[object] | None,
                   results: list[object]) -> tuple[list[int], int, int]:
        """:meth:`read` for many keys: sequence numbers, fields, values, fence and sequence
        numbers again, each step for the whole batch before the next."""
        tags = native.tags(self.salt, keys if type(keys) is list else list(keys))
        rows, words, seqs, offsets, sizes = self.index.find_many(key_tags(self.salt, keys) if tags is None else tags)
        if outs is None:
            for i, a, b in zip(rows.tolist(), offsets.tolist(), (offsets + sizes).tolist()):
                results[i] = bytearray(self.arena[a:b])
        else:
            copied = self._copy_into(outs, rows, offsets, sizes)
            if not copied.all():  # a buffer too small: the leased path reports it
                rows, words, seqs, sizes = rows[copied], words[copied], seqs[copied], sizes[copied]
            if len(rows) == len(keys):  # then rows is 0, 1, ..., n-1
                results[:len(keys)] = sizes.tolist()
            else:
                for i, n in zip(rows.tolist(), sizes.tolist()):
                    results[i] = n
        with self.fence:  # as in read_each
            pass
        valid = self.index.unchanged_many(words, seqs)
        conflicts = len(rows) - int(np.count_nonzero(valid))
        self.index.mark_read_many(words[valid] if conflicts else words)
        if not conflicts and len(rows) == len(keys):
            return [], len(rows), 0
        for i in rows[~valid].tolist():  # rewritten or withdrawn while we copied: the bytes may be torn
            results[i] = None
        served = np.zeros(len(keys), bool)
        served[rows[valid]] = True
        return np.flatnonzero(~served).tolist(), len(rows) - conflicts, conflicts

    def _copy_into(self, outs: Sequence[object], rows: np.ndarray, offsets: np.ndarray,
                   sizes: np.ndarray) -> np.ndarray:
        """Copy the arena ranges ``offsets``/``sizes`` into ``outs[rows]``: whether each fitted.
        Large values of a large batch go to threads (:func:`copy_pairs`), the rest to the C helper."""
        status = np.full(len(rows), -1, np.int8)  # 1 copied, 0 too small, -1 not yet copied
        if native.available():
            if self._base is None:
                self._base = native.address(self.arena)
            outs_list = list(outs)  # a list of our own: the helper indexes it
            small = np.flatnonzero(sizes < PARALLEL_VALUE_MIN) if int(sizes.sum()) >= PARALLEL_COPY_MIN else None
            if small is None:
                copied = native.gather(outs_list, self._base, rows, offsets, sizes)
            else:
                copied = native.gather(outs_list, self._base, rows[small], offsets[small], sizes[small])
            if copied is not None:  # (None only if the helper went away, e.g. in a test)
                status[slice(None) if small is None else small] = copied
        todo = np.flatnonzero(status < 0)  # no helper, large values, no plain buffer (e.g. a torch tensor)
        if len(todo):
            status[todo] = self._copy_in_python(outs, rows[todo], offsets[todo], sizes[todo])
        return status > 0

    def _copy_in_python(self, outs: Sequence[object], rows: np.ndarray, offsets: np.ndarray,
                        sizes: np.ndarray) -> np.ndarray:
        """:meth:`_copy_into` without the C helper: whether each fitted."""
        views = writable_views([outs[i] for i in rows.tolist()])
        room = np.fromiter(map(len, views), np.uint64, len(views))
        fits = room >= sizes
        arena, starts, ends = self.arena, offsets.tolist(), (offsets + sizes).tolist()
        if int(sizes[fits].sum()) >= PARALLEL_COPY_MIN or not fits.all():
            copy_pairs([(v[:b - a], arena[a:b]) for v, a, b, ok in zip(views, starts, ends, fits.tolist()) if ok],
                       int(sizes[fits].sum()))
        else:  # the common case, in the tightest loop
            dsts = views if (room == sizes).all() else [v[:b - a] for v, a, b in zip(views, starts, ends)]
            for d, a, b in zip(dsts, starts, ends):
                d[:] = arena[a:b]
        return fits
