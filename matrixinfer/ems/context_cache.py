"""Context cache: KV blocks in the pool, named by the engine's chained prefix hash.

A block's key is ``b"kv/" + h`` where ``h`` comes from :func:`matrixinfer.prefix_hash.chain_hashes`
(the same function as the engine's prefix cache), inside the client's namespace, so equal prefixes
share one stored copy however many requests produced them. Prefill uses it as::

    hashes = cache.block_hashes(prompt_ids)
    n = cache.lookup_prefix(hashes)              # leading blocks already in the pool
    cache.load_blocks(hashes[:n], kv_buffers[:n])
    ...compute the rest...
    cache.store_blocks_async(hashes[n:], kv_buffers[n:])
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from matrixinfer.ems.client import EmsClient
from matrixinfer.prefix_hash import chain_hashes

KEY_PREFIX = b"kv/"


class ContextCache:
    """KV blocks of ``block_size`` tokens keyed by chained prefix hash in ``client``'s namespace.

    ``hash_namespace`` seeds the hash chain (model and tenant, as for the engine's prefix cache);
    it defaults to the client's namespace.
    """

    def __init__(self, client: EmsClient, block_size: int, hash_namespace: str | None = None) -> None:
        self.client = client
        self.block_size = block_size
        self.hash_namespace = hash_namespace if hash_namespace is not None else client.namespace

    def block_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Chained hashes of every full block of ``token_ids``."""
        return chain_hashes(token_ids, self.block_size, self.hash_namespace)

    @staticmethod
    def key(block_hash: bytes) -> bytes:
        """Pool key of one block."""
        return KEY_PREFIX + block_hash

    def lookup_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of ``hashes`` are in the pool (one batched request per server)."""
        found = self.client.mexists([self.key(h) for h in hashes])
        n = 0
        while n < len(found) and found[n]:
            n += 1
        return n

    def load_blocks(self, hashes: Sequence[bytes], out_buffers: Sequence[object]) -> int:
        """Copy blocks into the caller's buffers (numpy arrays, CPU tensors, memoryviews).

        Returns the number of leading blocks loaded; buffers after the first miss are untouched
        or hold unused bytes (a block may vanish between lookup and load: that is a miss).
        """
        if len(hashes) != len(out_buffers):
            raise ValueError(f"load_blocks got {len(hashes)} hashes but {len(out_buffers)} buffers")
        got = self.client.mget([self.key(h) for h in hashes], out_buffers)
        n = 0
        while n < len(got) and got[n] is not None:
            n += 1
        return n

    def store_blocks(self, hashes: Sequence[bytes], buffers: Sequence[object]) -> int:
        """Store the blocks not already in the pool; returns how many were newly written."""
        if len(hashes) != len(buffers):
            raise ValueError(f"store_blocks got {len(hashes)} hashes but {len(buffers)} buffers")
        keys = [self.key(h) for h in hashes]
        present = self.client.mexists(keys)
        todo = [(k, b) for k, b, p in zip(keys, buffers, present) if not p]
        if not todo:
            return 0
        return sum(self.client.mput(todo, strict=False))

    def store_blocks_async(self, hashes: Sequence[bytes], buffers: Sequence[object]) -> Future:
        """:meth:`store_blocks` on the client's background thread; keep ``buffers`` unchanged until
        the future completes."""
        return self.client.submit(self.store_blocks, list(hashes), list(buffers))
