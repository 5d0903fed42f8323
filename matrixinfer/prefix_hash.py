"""The prefix hash shared by the engine's prefix cache and EMS's context cache.

A full KV block is named by a hash chained over every token id of the prefix up to and including
that block, seeded with a namespace (model and tenant), so equal names mean equal prefixes:
``h_0 = H(ns, tokens[0:B])``, ``h_i = H(h_{i-1}, tokens[iB:(i+1)B])``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DIGEST_SIZE = 16  # bytes; 128-bit names make accidental collisions negligible


def namespace_seed(namespace: str) -> bytes:
    """The chain's starting value for ``namespace`` (e.g. ``"model-id/tenant"``)."""
    return hashlib.blake2b(namespace.encode(), digest_size=DIGEST_SIZE, person=b"mi-prefix-ns").digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one block given its parent's hash (or the namespace seed for the first block)."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE, person=b"mi-prefix-blk")
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return h.digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, namespace: str) -> list[bytes]:
    """Hashes of every *full* block of ``token_ids`` (a trailing partial block has none)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    parent = namespace_seed(namespace)
    out: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        out.append(parent)
    return out
