"""Consistent hashing with virtual nodes: which servers own a key.

Each server is placed at ``vnodes`` points of a 64-bit ring; a key belongs to the first server
clockwise from its hash, and its replicas to the next distinct servers. Adding an N+1-th server
moves about 1/(N+1) of the keys and nothing else.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

DEFAULT_VNODES = 160


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class HashRing:
    """Immutable ring over server addresses."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        self.nodes = sorted(set(nodes))
        self.vnodes = vnodes
        points = sorted((_point(f"{node}#{i}".encode()), node) for node in self.nodes for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]

    def owners(self, key: bytes, replicas: int = 1) -> list[str]:
        """The ``replicas`` distinct servers responsible for ``key``, primary first."""
        if len(self.nodes) <= 1:
            return list(self.nodes)  # one server owns everything: skip hashing
        want = min(replicas, len(self.nodes))
        i = bisect.bisect(self._hashes, _point(key))
        out: list[str] = []
        for j in range(len(self._hashes)):
            node = self._owners[(i + j) % len(self._owners)]
            if node not in out:
                out.append(node)
                if len(out) == want:
                    break
        return out

    def primary(self, key: bytes) -> str | None:
        """The first owner of ``key`` (None on an empty ring)."""
        owners = self.owners(key, 1)
        return owners[0] if owners else None


def moved_fraction(before: HashRing, after: HashRing, keys: Iterable[bytes]) -> float:
    """Share of ``keys`` whose primary owner differs between two rings."""
    keys = list(keys)
    moved = sum(before.primary(k) != after.primary(k) for k in keys)
    return moved / max(1, len(keys))
