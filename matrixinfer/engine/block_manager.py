"""Paged KV block allocation with prefix caching (vLLM's ``BlockManager``).

A full block is named by the chained prefix hash of :mod:`matrixinfer.prefix_hash`; identical
prefixes share blocks through reference counts. Blocks whose count drops to zero keep their
contents and stay findable until they are evicted, least recently freed first; never-used or
unnamed free blocks are handed out before any cached one is evicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from matrixinfer.engine.sequence import Sequence
from matrixinfer.prefix_hash import block_hash, namespace_seed


class NoFreeBlocksError(RuntimeError):
    """The scheduler asked for more blocks than are free (a policy bug, never user input)."""


class BlockManager:
    """Owns block ids ``0..num_blocks-1`` of one KV cache."""

    def __init__(self, num_blocks: int, block_size: int, namespace: str = "default") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.seed = namespace_seed(namespace)
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hit_tokens = 0
        self.queried_tokens = 0
        self._seq_hashes: dict[str, list[bytes]] = {}

    # -- views the scheduler policy reads ---------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def freeable(self, seq: Sequence) -> int:
        """Blocks that would become free if ``seq`` released its table now."""
        return sum(1 for b in seq.block_table if self.ref_count[b] == 1)

    def lookup(self, seq: Sequence) -> tuple[list[int], int]:
        """Cached blocks covering ``seq``'s longest cached prefix, and how many of them are
        currently free (reviving them uses up free blocks). At least one token is left to compute."""
        ids = seq.all_ids
        max_blocks = (len(ids) - 1) // self.block_size
        hashes = self.block_hashes(seq, max_blocks)
        blocks: list[int] = []
        for h in hashes[:max_blocks]:
            b = self.hash_to_block.get(h)
            if b is None:
                break
            blocks.append(b)
        revive = sum(1 for b in blocks if self.ref_count[b] == 0)
        return blocks, revive

    def block_hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The first ``n`` full-block hashes of ``seq`` (memoised per sequence)."""
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        if len(hashes) >= n:
            return hashes[:n]
        ids = seq.all_ids
        bs = self.block_size
        while len(hashes) < n:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.seed
            hashes.append(block_hash(parent, ids[i * bs:(i + 1) * bs]))
        return hashes[:n]

    # -- state changes the engine applies ---------------------------------------------------
    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give ``seq`` the cached prefix blocks from :meth:`lookup` and count the hit."""
        for b in cached:
            if self.ref_count[b] == 0:
                self.evictable.pop(b)
            self.ref_count[b] += 1
        seq.block_table = list(cached)
        seq.num_computed = len(cached) * self.block_size
        seq.num_cached_tokens = seq.num_computed
        self.hit_tokens += seq.num_computed
        self.queried_tokens += (seq.num_tokens - 1) // self.block_size * self.block_size

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s table to hold ``num_tokens`` tokens."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise NoFreeBlocksError(f"{seq.request_id}: needs {need} blocks, {self.num_free} free")
        for _ in range(need):
            seq.block_table.append(self._take())

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Release ``seq``'s blocks past the first ``num_tokens`` tokens (speculative decoding rolls
        back rejected drafts; their blocks were never committed, so they are plain free blocks)."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            b = seq.block_table.pop()
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if self.hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free_plain.append(b)

    def commit(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Name the blocks that ``seq`` has completely computed so later requests can share them
        (only those within its first ``num_tokens`` known tokens, when given: accepted draft tokens
        are computed before they are appended)."""
        full = (seq.num_computed if num_tokens is None else min(num_tokens, seq.num_computed)) // self.block_size
        if full <= seq.num_committed:
            return
        hashes = self.block_hashes(seq, full)
        for i in range(seq.num_committed, full):
            b = seq.block_table[i]
            if self.hash_of[b] is not None:
                continue
            h = hashes[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = b
                self.hash_of[b] = h
        seq.num_committed = full

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (tail first, so a prefix's tail is evicted before its head)."""
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if self.hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free_plain.append(b)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_committed = 0
        self._seq_hashes.pop(seq.request_id, None)

    # -- internals ----------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free_plain:
            b = self.free_plain.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            h = self.hash_of[b]
            if h is not None and self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
            self.hash_of[b] = None
        self.ref_count[b] = 1
        return b
