"""The SSD tier: a directory of checksummed value files with its own capacity and LRU.

Each spilled value is one file written to a temporary name and renamed into place, with a header
carrying its namespace, key, length and CRC32. A restart rebuilds the index from the headers
(oldest modification time first) and a read verifies length and checksum, so a torn or foreign
file is dropped and reported as a miss, never served.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass

MAGIC = b"EMSv"
HEADER = struct.Struct("<4sHHQI")  # magic, namespace length, key length, value length, crc32
SUFFIX = ".ems"


@dataclass
class SsdEntry:
    """Where one spilled value lives and how to check it."""

    path: str
    size: int
    crc: int
    file_bytes: int


def _file_name(ns: str, key: bytes) -> str:
    return hashlib.blake2b(ns.encode() + b"\0" + key, digest_size=16).hexdigest() + SUFFIX


class SsdTier:
    """LRU store of values in ``directory`` holding at most ``capacity`` bytes of files."""

    def __init__(self, directory: str, capacity: int, fsync: bool = False) -> None:
        self.directory = directory
        self.capacity = capacity
        self.fsync = fsync
        self.index: OrderedDict[tuple[str, bytes], SsdEntry] = OrderedDict()  # oldest first
        self.used = 0
        self.ns_bytes: dict[str, int] = {}
        self.protected: set[tuple[str, bytes]] = set()  # being promoted: not evictable
        self.dropped_on_recovery = 0
        self.evictions = 0
        self.corrupt_reads = 0
        os.makedirs(directory, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        found: list[tuple[float, tuple[str, bytes], SsdEntry]] = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if not name.endswith(SUFFIX):
                if name.endswith(".tmp"):  # a write interrupted by a crash
                    os.unlink(path)
                continue
            try:
                with open(path, "rb") as f:
                    magic, ns_len, key_len, size, crc = HEADER.unpack(f.read(HEADER.size))
                    ns = f.read(ns_len).decode()
                    key = f.read(key_len)
                    st = os.fstat(f.fileno())
                ok = magic == MAGIC and st.st_size == HEADER.size + ns_len + key_len + size
                ok = ok and name == _file_name(ns, key)
            except (OSError, struct.error, UnicodeDecodeError):
                ok = False
            if not ok:
                self.dropped_on_recovery += 1
                os.unlink(path)
                continue
            found.append((st.st_mtime, (ns, key), SsdEntry(path, size, crc, st.st_size)))
        for _, nk, entry in sorted(found, key=lambda t: t[0]):
            self._insert(nk, entry)
        while self.used > self.capacity and self._evict_one():
            pass

    def _insert(self, nk: tuple[str, bytes], entry: SsdEntry) -> None:
        self.index[nk] = entry
        self.used += entry.file_bytes
        self.ns_bytes[nk[0]] = self.ns_bytes.get(nk[0], 0) + entry.file_bytes

    def _evict_one(self) -> bool:
        victim = next((nk for nk in self.index if nk not in self.protected), None)
        if victim is None:
            return False
        self.delete(*victim)
        self.evictions += 1
        return True

    def contains(self, ns: str, key: bytes) -> bool:
        """Whether ``(ns, key)`` has a spilled copy."""
        return (ns, key) in self.index

    def size_of(self, ns: str, key: bytes) -> int | None:
        """Length of the spilled value, or None."""
        entry = self.index.get((ns, key))
        return None if entry is None else entry.size

    def put(self, ns: str, key: bytes, data: memoryview) -> bool:
        """Write ``data`` as the value of ``(ns, key)``; False when it cannot fit the tier at all."""
        header = HEADER.pack(MAGIC, len(ns.encode()), len(key), len(data), zlib.crc32(data)) + ns.encode() + key
        file_bytes = len(header) + len(data)
        if file_bytes > self.capacity:
            return False
        self.delete(ns, key)
        while self.used + file_bytes > self.capacity:
            if not self._evict_one():
                return False
        path = os.path.join(self.directory, _file_name(ns, key))
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._insert((ns, key), SsdEntry(path, len(data), HEADER.unpack(header[:HEADER.size])[4], file_bytes))
        return True

    def read_into(self, ns: str, key: bytes, out: memoryview) -> bool:
        """Read the value of ``(ns, key)`` into ``out`` (exactly its length) and verify it.

        A file that is missing, short, foreign or fails its checksum is deleted and reported False.
        """
        entry = self.index.get((ns, key))
        if entry is None:
            return False
        ok = False
        try:
            with open(entry.path, "rb") as f:
                magic, ns_len, key_len, size, crc = HEADER.unpack(f.read(HEADER.size))
                ok = (magic == MAGIC and size == entry.size == len(out)
                      and f.read(ns_len) == ns.encode() and f.read(key_len) == key)
                ok = ok and f.readinto(out) == size and zlib.crc32(out) == crc
        except (OSError, struct.error):
            ok = False
        if not ok:
            self.delete(ns, key)
            self.corrupt_reads += 1
            return False
        self.index.move_to_end((ns, key))
        return True

    def delete(self, ns: str, key: bytes) -> bool:
        """Remove the spilled copy of ``(ns, key)`` if any."""
        entry = self.index.pop((ns, key), None)
        if entry is None:
            return False
        self.used -= entry.file_bytes
        self.ns_bytes[ns] -= entry.file_bytes
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        return True

    def used_by(self, ns: str) -> tuple[int, int]:
        """``(bytes, entries)`` of ``ns`` on this tier."""
        return self.ns_bytes.get(ns, 0), sum(1 for n, _ in self.index if n == ns)
