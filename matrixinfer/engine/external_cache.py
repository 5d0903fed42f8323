"""The interface an engine uses to reach a prefix cache outside its own KV memory (EMS in the
PDC deployment): look up how many more prefix blocks exist, load them into KV blocks, and store
newly computed blocks off the critical path."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExternalPrefixCache(ABC):
    """Blocks are named by the chained prefix hash of :mod:`matrixinfer.prefix_hash` and hold one
    block's latents for every layer, ``[num_layers, block_size, dim]``."""

    @abstractmethod
    def lookup(self, hashes: list[bytes]) -> int:
        """How many leading blocks of ``hashes`` the cache holds."""

    @abstractmethod
    def load(self, hashes: list[bytes], blocks: list[torch.Tensor]) -> int:
        """Copy blocks into ``blocks`` (views into the KV cache); return how many leading ones loaded."""

    @abstractmethod
    def store_async(self, hashes: list[bytes], blocks: list[torch.Tensor]) -> None:
        """Store copies of ``blocks`` (the caller may reuse the memory as soon as this returns)."""
