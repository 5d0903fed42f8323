"""The DRAM arena: one shared-memory segment and a variable-length allocator over it.

:class:`Allocator` is pure policy (offsets and sizes, no memory): best-fit over a free list that
coalesces neighbours on free, so the pool needs no per-key OS object. :class:`SharedArena` is the
segment itself, an anonymous shared-memory file whose descriptor same-host clients receive and map
to read and write values directly (the analogue of the paper's load/store access over the unified bus).
"""

from __future__ import annotations

import bisect
import mmap
import os
import tempfile

ALIGN = 64  # cache-line alignment keeps copies into and out of the arena fast


def align_up(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align`` (at least ``align``, so empty values get a slot)."""
    return max(align, (n + align - 1) // align * align)


class Allocator:
    """Best-fit allocator of ``[0, capacity)`` with coalescing free blocks.

    Free blocks are kept three ways: a list sorted by ``(size, offset)`` for best fit, and two dicts
    keyed by a block's start and end so a freed block merges with its neighbours in O(log n).
    """

    def __init__(self, capacity: int, align: int = ALIGN) -> None:
        if capacity < align:
            raise ValueError(f"arena capacity {capacity} is smaller than one {align}-byte slot")
        self.capacity = capacity - capacity % align
        self.align = align
        self._by_size: list[tuple[int, int]] = []  # (size, offset), sorted
        self._by_start: dict[int, int] = {}  # offset -> size
        self._by_end: dict[int, int] = {}  # offset + size -> offset
        self._used: dict[int, int] = {}  # offset -> aligned size of live allocations
        self.used_bytes = 0
        self._add_free(0, self.capacity)

    def _add_free(self, offset: int, size: int) -> None:
        bisect.insort(self._by_size, (size, offset))
        self._by_start[offset] = size
        self._by_end[offset + size] = offset

    def _remove_free(self, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._by_size, (size, offset))
        del self._by_size[i]
        del self._by_start[offset]
        del self._by_end[offset + size]

    def alloc(self, size: int) -> int | None:
        """Offset of a new block of at least ``size`` bytes, or None when no free block is big enough."""
        need = align_up(size, self.align)
        i = bisect.bisect_left(self._by_size, (need, -1))
        if i == len(self._by_size):
            return None
        block_size, offset = self._by_size[i]
        self._remove_free(offset, block_size)
        if block_size > need:
            self._add_free(offset + need, block_size - need)
        self._used[offset] = need
        self.used_bytes += need
        return offset

    def free(self, offset: int) -> None:
        """Return the block at ``offset`` and merge it with free neighbours."""
        size = self._used.pop(offset, None)
        if size is None:
            raise KeyError(f"arena offset {offset} is not an allocated block")
        self.used_bytes -= size
        start, end = offset, offset + size
        prev_start = self._by_end.get(start)
        if prev_start is not None:
            self._remove_free(prev_start, start - prev_start)
            start = prev_start
        next_size = self._by_start.get(end)
        if next_size is not None:
            self._remove_free(end, next_size)
            end += next_size
        self._add_free(start, end - start)

    def block_size(self, offset: int) -> int:
        """Aligned size of the live block at ``offset``."""
        return self._used[offset]

    def largest_free(self) -> int:
        """Size of the largest free block (0 when full)."""
        return self._by_size[-1][0] if self._by_size else 0

    def free_blocks(self) -> list[tuple[int, int]]:
        """Free blocks as ``(offset, size)`` sorted by offset (for tests and stats)."""
        return sorted(self._by_start.items())

    def fits(self, size: int) -> bool:
        """Whether a block of ``size`` bytes could ever fit (the arena is big enough)."""
        return align_up(size, self.align) <= self.capacity


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class SharedArena:
    """An anonymous shared-memory segment (``memfd``) that same-host clients map.

    It has no name in any file system: the server hands its descriptor to clients of its own OS
    user over its unix socket (:mod:`matrixinfer.ems.server`), so a SIGKILLed server leaves nothing
    behind, and the memory is freed once the server and every client have unmapped it. The
    same-host fast path trusts the OS user; the protocol enforces namespaces for everyone else (see
    docs/ems.md). Values take the first ``capacity`` bytes (``view``); ``extra`` bytes after them,
    from ``extra_offset`` (``extra_view``), hold the shared index (:mod:`matrixinfer.ems.index`).
    """

    def __init__(self, capacity: int, extra: int = 0) -> None:
        remove_orphan_segments()  # named segments left by servers of earlier versions
        self.path = f"memfd:matrixinfer-ems-{os.getpid()}"  # names the segment in messages only
        self.capacity = capacity
        self.extra_offset = align_up(capacity) if extra else capacity
        self.size = self.extra_offset + extra
        self.fd = os.memfd_create(self.path.removeprefix("memfd:"), os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.mmap = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        whole = memoryview(self.mmap)
        self.view = whole[:capacity]
        self.extra_view = whole[self.extra_offset:]

    def close(self) -> None:
        """Close the descriptor; the server's and clients' mappings stay valid until they unmap."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def remove_orphan_segments() -> int:
    """Unlink arena segments left by killed servers of this pid namespace (pid no longer exists)."""
    removed = 0
    directory = _shm_dir()
    for name in os.listdir(directory):
        parts = name.split("-")
        if (name.startswith("matrixinfer-ems-") and len(parts) == 5 and parts[2].isdigit()
                and parts[3] == _pid_namespace()):
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                try:
                    os.unlink(os.path.join(directory, name))
                    removed += 1
                except OSError:
                    pass
            except PermissionError:
                pass  # alive, owned by someone else
    return removed


def map_arena(fd: int, capacity: int) -> memoryview:
    """Map a server's arena from the descriptor it handed over (raises OSError when unusable); the
    caller still owns ``fd``."""
    size = os.fstat(fd).st_size
    if size != capacity:
        raise OSError(f"arena descriptor has size {size}, the server said {capacity}")
    return memoryview(mmap.mmap(fd, capacity))
