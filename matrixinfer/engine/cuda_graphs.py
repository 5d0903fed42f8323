"""CUDA graphs for decode steps: one graph per batch-size bucket, captured into static buffers
and replayed (nano-vllm's model runner does the same).

A decode step of the eager model issues hundreds of small launches whose host cost exceeds their
GPU time (issue 16: 12.4 ms of host time against 4.2 ms of GPU time per step at batch 64). A
captured graph replays all of them in one call. The graph's shapes and host values are frozen at
capture, so:

- a batch of ``n`` sequences runs in the smallest bucket ``>= n`` (:func:`bucket_for`); the rows
  past ``n`` are padding that writes its latent to a reserved scratch block (``pad_block``) and
  attends to that one key;
- inputs are copied into static buffers (:meth:`DecodeGraphs.fill`), never replaced;
- attention must read lengths from device tensors only: the Triton absorbed kernel does (each
  token's key count is ``tok_nkeys``), and its key ranges are sized from the metadata's
  ``context_lens``, which here all hold the bound ``max_context``. The PyTorch attention builds
  padded groups from the host lengths, so :class:`DecodeGraphs` refuses a model whose attention is
  not bound to the ``cuda`` backend, and an INT8 cache (which the kernel cannot read).

Without CUDA (or with ``capture=False``) :meth:`DecodeGraphs.run` runs the model eagerly on the
same static buffers, which is how the padding logic is tested on CPU (under Triton's interpreter).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from matrixinfer.model.attention import AttentionMetadata, Int8PagedLatentCache, PagedLatentCache, block_slots

log = logging.getLogger(__name__)


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 below ``max_batch``, then ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    candidates = [1, 2, 4, 8] + list(range(16, max_batch, 16))
    return [b for b in candidates if b < max_batch] + [max_batch]


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` sequences."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"a decode batch of {n} sequences exceeds the largest captured bucket {buckets[-1]}")


class DecodeGraphs:
    """Static decode inputs for batches up to ``max_batch`` and, on CUDA, one graph per bucket.

    ``model`` is a :class:`~matrixinfer.model.deepseek.DeepseekForCausalLM` bound by
    ``select_backend`` (its attention on ``cuda``); ``cache`` its paged cache; ``max_blocks`` the
    block-table width (the longest sequence in blocks); ``pad_block`` a cache block no sequence
    owns, where padding rows write.
    """

    def __init__(self, model: nn.Module, cache: PagedLatentCache, max_batch: int, max_blocks: int, pad_block: int,
                 buckets: Sequence[int] | None = None) -> None:
        if isinstance(cache, Int8PagedLatentCache):
            raise ValueError("CUDA graphs need the Triton attention, which reads a value cache, not INT8 rows")
        unbound = [name for name, m in model.named_modules()
                   if type(m).__name__ == "MLA" and getattr(m, "backend", None) != "cuda"]
        if unbound:
            raise ValueError(f"CUDA graphs need every MLA on the cuda (Triton) backend; {unbound[0]} is not "
                             "(install the cuda extra and call select_backend after moving the model)")
        if not 0 <= pad_block < cache.num_blocks:
            raise ValueError(f"pad_block {pad_block} is not a block of the cache (0..{cache.num_blocks - 1})")
        self.model, self.cache = model, cache
        self.buckets = list(buckets) if buckets is not None else decode_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_blocks = max_blocks
        self.max_context = max_blocks * cache.block_size
        self.pad_block = pad_block
        dev = cache.device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.tok_seq = torch.arange(n, dtype=torch.int32, device=dev)
        self.tok_nkeys = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def metadata(self, bucket: int) -> AttentionMetadata:
        """The bucket's metadata over the static buffers: host lengths hold the bound
        ``max_context`` (what the kernel sizes its key ranges from), device ones the real lengths."""
        return AttentionMetadata([1] * bucket, [self.max_context] * bucket, self.slot_mapping[:bucket],
                                 block_tables=self.block_tables[:bucket], block_size=self.cache.block_size,
                                 tok_seq=self.tok_seq[:bucket], tok_nkeys=self.tok_nkeys[:bucket])

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> int:
        """Copy a decode batch (one new token per sequence at ``positions``, tables ``[n, W]``) into
        the static buffers; returns its bucket. Padding rows write to and read from ``pad_block``."""
        n = input_ids.shape[0]
        bucket = bucket_for(n, self.buckets)
        if positions.shape != (n,) or block_tables.dim() != 2 or block_tables.shape[0] != n:
            raise ValueError(f"decode batch of {n} tokens with positions {list(positions.shape)} and block "
                             f"tables {list(block_tables.shape)}")
        w = block_tables.shape[1]
        if w > self.max_blocks:
            raise ValueError(f"block tables {w} wide exceed the captured width {self.max_blocks}")
        bs = self.cache.block_size
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.block_tables[:n, :w].copy_(block_tables, non_blocking=True)
        self.block_tables[n:bucket].fill_(self.pad_block)
        self.input_ids[n:bucket].zero_()
        self.positions[n:bucket].zero_()
        pos = self.positions[:bucket]
        tables = self.block_tables[:bucket]
        self.slot_mapping[:bucket].copy_(block_slots(tables.gather(1, (pos // bs)[:, None]).squeeze(1),
                                                     pos, bs))
        self.tok_nkeys[:bucket].copy_(pos + 1)
        return bucket

    def capture(self) -> None:
        """Capture one graph per bucket, largest first, sharing one memory pool. A bucket whose
        forward cannot be captured (a host synchronisation inside) stays eager, with a warning."""
        if not self.cache.device.type == "cuda":
            raise RuntimeError("CUDA graphs need the model and cache on a CUDA device")
        pool = None
        for bucket in reversed(self.buckets):
            meta = self.metadata(bucket)
            self.fill(self.input_ids[:bucket].clone(), torch.zeros_like(self.positions[:bucket]),
                      torch.full((bucket, 1), self.pad_block, dtype=torch.int32, device=self.cache.device))
            with torch.no_grad():
                self.model(self.input_ids[:bucket], self.positions[:bucket], meta, self.cache)  # warm-up
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=pool):
                        out = self.model(self.input_ids[:bucket], self.positions[:bucket], meta, self.cache)
                except RuntimeError as e:
                    log.warning("decode bucket %d stays eager: capture failed (%s)", bucket, e)
                    continue
            pool = graph.pool()
            self.graphs[bucket], self.outputs[bucket] = graph, out
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of a decode batch: its bucket's graph replayed, or the
        model run eagerly on the static buffers where none was captured."""
        n = input_ids.shape[0]
        bucket = self.fill(input_ids, positions, block_tables)
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
            return self.outputs[bucket][:n]
        with torch.no_grad():
            return self.model(self.input_ids[:bucket], self.positions[:bucket], self.metadata(bucket), self.cache)[:n]
