"""The engine's one seam to KV that lives outside its own cache (vLLM's ``KVConnectorBase_V1``,
condensed to one process): an external prefix cache (EMS) and the prefill-to-decode handoff of
the PDC deployment are both connectors.

The engine calls a connector at fixed points of a step and nowhere else:

- scheduler side: :meth:`~KVConnector.num_external_blocks` when a waiting request is considered
  (how many prefix blocks past the local hit exist outside), :meth:`~KVConnector.after_alloc` once
  blocks for them are allocated (fill them), :meth:`~KVConnector.request_finished` when the request
  leaves the engine for any reason;
- worker side: :meth:`~KVConnector.save` after each step that computed tokens of a request (offer
  newly full blocks), :meth:`~KVConnector.take_over` after a request's first sampled token (a
  prefill instance sends the KV to a decode instance and the request leaves this engine).

A connector sees the KV cache only through :class:`~matrixinfer.model.attention.PagedLatentCache`'s
block and token accessors, given once by :meth:`~KVConnector.bind`; blocks are named by the chained
prefix hashes of :mod:`matrixinfer.prefix_hash`, computed by the engine's block manager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matrixinfer.engine.sampler import Sampler
    from matrixinfer.engine.sequence import Sequence
    from matrixinfer.model.attention import PagedLatentCache


class KVConnector:
    """Base connector: every hook does nothing, so a connector implements only what it uses."""

    cache: PagedLatentCache
    sampler: Sampler

    def bind(self, cache: PagedLatentCache, sampler: Sampler) -> None:
        """The engine's KV cache and sampler (whose per-request state travels with a handoff)."""
        self.cache = cache
        self.sampler = sampler

    # -- scheduler side --------------------------------------------------------------------------
    def num_external_blocks(self, seq: Sequence, hashes: list[bytes]) -> int:
        """How many leading blocks of ``hashes`` (the prefix blocks after the local hit) are held
        outside and could be loaded."""
        return 0

    def after_alloc(self, seq: Sequence, hashes: list[bytes], block_ids: list[int]) -> int:
        """Blocks ``block_ids`` were allocated for ``hashes``; fill them, return how many leading
        ones were loaded (the rest are computed)."""
        return 0

    def request_finished(self, seq: Sequence) -> None:
        """``seq`` left the engine (finished, aborted, preempted for good or handed off)."""

    # -- worker side -----------------------------------------------------------------------------
    def save(self, seq: Sequence, hashes: list[bytes]) -> None:
        """``hashes`` name every full block ``seq`` has computed; store the new ones off the
        critical path (the blocks may be reused as soon as this returns)."""

    def take_over(self, seq: Sequence, token: int, logprob: float | None) -> bool:
        """Called after ``seq``'s first sampled token when it does not finish the request; True
        means the request continues elsewhere (its KV was read out before returning)."""
        return False

    def stats(self) -> dict[str, int | float]:
        """:class:`~matrixinfer.engine.outputs.EngineStats` fields this connector counts."""
        return {}


class MultiConnector(KVConnector):
    """Several connectors behind one (a prefill instance: the EMS context cache and the handoff).
    Lookups go to the first connector that holds blocks for a request; every connector saves,
    hears of finished requests and may take a request over."""

    def __init__(self, connectors: list[KVConnector]) -> None:
        self.connectors = connectors
        self._source: dict[str, KVConnector] = {}

    def bind(self, cache: PagedLatentCache, sampler: Sampler) -> None:
        super().bind(cache, sampler)
        for c in self.connectors:
            c.bind(cache, sampler)

    def num_external_blocks(self, seq: Sequence, hashes: list[bytes]) -> int:
        for c in self.connectors:
            n = c.num_external_blocks(seq, hashes)
            if n:
                self._source[seq.request_id] = c
                return n
        return 0

    def after_alloc(self, seq: Sequence, hashes: list[bytes], block_ids: list[int]) -> int:
        source = self._source.get(seq.request_id)
        return source.after_alloc(seq, hashes, block_ids) if source is not None else 0

    def request_finished(self, seq: Sequence) -> None:
        self._source.pop(seq.request_id, None)
        for c in self.connectors:
            c.request_finished(seq)

    def save(self, seq: Sequence, hashes: list[bytes]) -> None:
        for c in self.connectors:
            c.save(seq, hashes)

    def take_over(self, seq: Sequence, token: int, logprob: float | None) -> bool:
        return any(c.take_over(seq, token, logprob) for c in self.connectors)

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for c in self.connectors:
            for k, v in c.stats().items():
                out[k] = out.get(k, 0) + v
        return out
