"""Per-batch attention metadata and the latent KV-cache interface the serving engine implements.

A batch is flattened: the new tokens of all sequences are concatenated (no padding) and each
sequence contributes ``query_lens[s]`` tokens that see the first ``context_lens[s]`` tokens of
that sequence (cached ones plus the new ones). Keys live in a flat table of *slots*: either cache
slots (``block_table[pos // block_size] * block_size + pos % block_size``) or, without a cache,
the indices of the batch's own new tokens (:func:`block_slots`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


class KVCache(ABC):
    """Storage for MLA latents: one ``[num_slots, kv_lora_rank + qk_rope_head_dim]`` table per layer."""

    @abstractmethod
    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        """Store ``latent[i]`` at slot ``slots[i]`` of ``layer``."""

    @abstractmethod
    def layer_slots(self, layer: int) -> torch.Tensor:
        """The ``[num_slots, dim]`` table of ``layer`` that key slots index into."""

    def gather(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The latents at ``slots`` of ``layer``, ``[len(slots), dim]``, in the cache's compute dtype."""
        return self.layer_slots(layer).index_select(0, slots)


def block_slots(blocks: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each token at position ``pos`` whose block is ``blocks`` (the block table
    entry ``pos // block_size``): the one place the slot formula is written."""
    return blocks.long() * block_size + pos % block_size


class PagedLatentCache(KVCache):
    """A paged latent cache: ``num_blocks`` blocks of ``block_size`` tokens per layer, one tensor.

    Code outside the model reads and writes a sequence's tokens through :meth:`slots`,
    :meth:`read_tokens` and :meth:`write_tokens` (KV transfer) or whole blocks through
    :meth:`block_view` (the external prefix cache), never through ``data`` directly.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dim = dim
        self.data = torch.zeros(num_layers, num_blocks * block_size, dim, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        self.data[layer].index_copy_(0, slots, latent.to(self.data.dtype))

    def layer_slots(self, layer: int) -> torch.Tensor:
        return self.data[layer]

    def slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slots of the first ``num_tokens`` tokens of a sequence with ``block_table``."""
        pos = torch.arange(num_tokens)
        table = torch.tensor(block_table, dtype=torch.long)
        return block_slots(table[pos // self.block_size], pos, self.block_size).to(self.data.device)

    def read_tokens(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A CPU copy of every layer's latents of the first ``num_tokens`` tokens, ``[layers, tokens, dim]``."""
        return self._decode(self.data.index_select(1, self.slots(block_table, num_tokens))).cpu()

    def write_tokens(self, block_table: list[int], kv: torch.Tensor, layer_start: int = 0) -> None:
        """Store ``kv`` ``[layers, tokens, dim]`` as layers ``layer_start..`` of the first tokens of a
        sequence with ``block_table``."""
        layers, tokens, dim = kv.shape
        if dim != self.dim or layer_start < 0 or layer_start + layers > self.num_layers:
            raise ValueError(f"KV of shape {list(kv.shape)} at layer {layer_start} does not fit a cache of "
                             f"{self.num_layers} layers x {self.dim} values")
        if -(-tokens // self.block_size) > len(block_table):
            raise ValueError(f"{tokens} tokens do not fit {len(block_table)} blocks of {self.block_size}")
        self.data[layer_start:layer_start + layers].index_copy_(1, self.slots(block_table, tokens), self._encode(kv))

    def _encode(self, kv: torch.Tensor) -> torch.Tensor:
        """``[layers, tokens, dim]`` values as stored."""
        return kv.to(self.data.device, self.data.dtype)

    def _decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored ``[layers, tokens, *]`` rows as values."""
        return stored

    def block_view(self, block_id: int) -> torch.Tensor:
        """All layers' latents of one block, ``[num_layers, block_size, dim]`` (a view)."""
        start = block_id * self.block_size
        return self.data[:, start:start + self.block_size]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, dim: int, dtype: torch.dtype) -> int:
        return num_layers * block_size * dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class AttentionGroup:
    """Sequences attended together as one padded batch.

    ``token_index`` ``[S, Q]`` picks each query row from the flat batch, ``key_slots`` ``[S, L]``
    picks each key from the slot table, ``mask`` ``[S, Q, L]`` is True where a query may attend.
    ``valid`` ``[S, Q]`` marks real (non-padding) query rows. ``decode`` groups hold one new token
    per sequence and use the weight-absorbed path in ``auto`` mode.
    """

    token_index: torch.Tensor
    key_slots: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    decode: bool


@dataclass
class AttentionMetadata:
    """Everything attention needs about a flattened batch, built once and passed to every layer.

    Attributes:
        query_lens: new tokens per sequence (their sum is the flat batch size).
        context_lens: tokens each sequence attends to after this step (cached + new).
        slot_mapping: ``[T]`` cache slot where each new token's latent is written, or None when
            the batch runs without a cache (keys are then the batch's own tokens).
        groups: how sequences are batched for attention.
        mode: ``auto`` (naive for prefill groups, absorbed for decode groups), ``naive`` or ``absorbed``.
    """

    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None
    mode: str = "auto"
    block_tables: torch.Tensor | None = None
    block_size: int | None = None
    tok_seq: torch.Tensor | None = None
    tok_nkeys: torch.Tensor | None = None
    _groups: list[AttentionGroup] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def paged(self) -> bool:
        """Whether keys come from a paged cache (then ``block_tables`` ``[S, W]`` int32,
        ``tok_seq`` (each token's sequence row) and ``tok_nkeys`` (keys it sees) are set)."""
        return self.tok_nkeys is not None

    @property
    def groups(self) -> list[AttentionGroup]:
        """Padded attention groups for the PyTorch attention paths, built on first use (a fused
        kernel reading the paged cache directly never needs them)."""
        if self._groups is None:
            self._groups = self._build_groups()
        return self._groups

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int] | None = None,
              block_tables: torch.Tensor | None = None, block_size: int | None = None,
              device: torch.device | str = "cpu", mode: str = "auto") -> AttentionMetadata:
        """Metadata for sequences with ``query_lens`` new tokens each.

        Without ``block_tables`` the batch is cache-free: ``context_lens`` must equal
        ``query_lens``. With them (``[S, max_blocks]`` block ids, ``block_size`` tokens each), the
        new tokens are the last ``query_lens[s]`` of ``context_lens[s]`` and are written to the cache.
        """
        if mode not in ("auto", "naive", "absorbed"):
            raise ValueError(f"attention mode must be auto, naive or absorbed, got {mode!r}")
        if context_lens is None:
            context_lens = list(query_lens)
        if len(context_lens) != len(query_lens):
            raise ValueError("query_lens and context_lens must have one entry per sequence")
        for q, c in zip(query_lens, context_lens):
            if q < 1 or c < q:
                raise ValueError(f"each sequence needs 1 <= query_len <= context_len, got {q}, {c}")
        device = torch.device(device)
        if block_tables is None:
            if list(context_lens) != list(query_lens):
                raise ValueError("a cache-free batch attends only to its own tokens: "
                                 "context_lens must equal query_lens")
            return cls(list(query_lens), list(context_lens), None, mode=mode)
        if block_size is None:
            raise ValueError("block_tables need block_size")
        tables = block_tables.to(device=device, dtype=torch.int32).contiguous()
        if all(q == 1 for q in query_lens):  # decode: one token per sequence, the last one
            seq_idx = torch.arange(len(query_lens), device=device)
            pos = torch.tensor(context_lens, device=device) - 1
        else:
            seq_idx = torch.repeat_interleave(torch.arange(len(query_lens), device=device),
                                              torch.tensor(query_lens, device=device))
            pos = torch.cat([torch.arange(c - q, c, device=device) for q, c in zip(query_lens, context_lens)])
        slot_mapping = block_slots(tables[seq_idx, pos // block_size], pos, block_size)
        return cls(list(query_lens), list(context_lens), slot_mapping, mode=mode, block_tables=tables,
                   block_size=block_size, tok_seq=seq_idx.to(torch.int32), tok_nkeys=(pos + 1).to(torch.int32))

    def _build_groups(self) -> list[AttentionGroup]:
        query_lens, context_lens = self.query_lens, self.context_lens
        device = self.slot_mapping.device if self.slot_mapping is not None else torch.device("cpu")
        block_tables = None if self.block_tables is None else self.block_tables.long()
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        decode = [s for s, q in enumerate(query_lens) if q == 1]
        prefill = [s for s, q in enumerate(query_lens) if q > 1]
        # Decodes batch together; prefills batch together when their shapes agree (training, tests).
        batches: list[tuple[list[int], bool]] = []
        if decode:
            batches.append((decode, True))
        if prefill:
            shapes = {(query_lens[s], context_lens[s]) for s in prefill}
            batches += [(prefill, False)] if len(shapes) == 1 else [([s], False) for s in prefill]
        return [self._group(seqs, is_decode, query_lens, context_lens, starts, block_tables, self.block_size, device)
                for seqs, is_decode in batches]

    @staticmethod
    def _group(seqs: list[int], decode: bool, query_lens: list[int], context_lens: list[int],
               starts: list[int], block_tables: torch.Tensor | None, block_size: int | None,
               device: torch.device) -> AttentionGroup:
        q = torch.tensor([query_lens[s] for s in seqs], device=device)
        c = torch.tensor([context_lens[s] for s in seqs], device=device)
        st = torch.tensor([starts[s] for s in seqs], device=device)
        qmax, lmax = max(query_lens[s] for s in seqs), max(context_lens[s] for s in seqs)  # no device sync
        qi = torch.arange(qmax, device=device)
        kj = torch.arange(lmax, device=device)
        valid = qi[None, :] < q[:, None]
        token_index = torch.where(valid, st[:, None] + qi[None, :], torch.zeros_like(qi)[None, :])
        if block_tables is None:
            key_slots = st[:, None] + kj[None, :]
        else:
            assert block_size is not None  # block tables come with their block size (build checks it)
            bt = block_tables[torch.tensor(seqs, device=device)]
            blocks = bt.gather(1, (kj // block_size).clamp(max=bt.shape[1] - 1)[None, :].expand(len(seqs), -1))
            key_slots = block_slots(blocks, kj[None, :], block_size)
        key_ok = kj[None, :] < c[:, None]
        key_slots = torch.where(key_ok, key_slots, torch.zeros_like(key_slots))
        # Query i of a sequence sits at position context_len - query_len + i and sees keys up to it.
        qpos = (c - q)[:, None] + qi[None, :]
        mask = (kj[None, None, :] <= qpos[:, :, None]) & key_ok[:, None, :] & valid[:, :, None]
        # Padding rows attend to key 0 only, so their (discarded) softmax stays finite.
        mask = mask | (~valid[:, :, None] & (kj == 0)[None, None, :])
        return AttentionGroup(token_index, key_slots, mask, valid, decode)


class Int8PagedLatentCache(PagedLatentCache):
    """A paged latent cache holding INT8 latents (``--kv-cache-dtype int8``): half the bytes of a
    bfloat16 cache, a quarter of a float32 one, so twice or four times the tokens in the same memory.

    Each slot stores its ``dim`` values as symmetric INT8 with two float32 scales, one for the
    compressed latent (the first ``split`` values, RMS-normalised) and one for the rotary key part,
    whose ranges differ. Scales are per token rather than per block: a block fills one token at a
    time, and a per-token scale never has to be widened (and the block re-quantized) when a later
    token is larger. A slot is one byte row (values, padding to 4 bytes, the scales), so
    :meth:`block_view` is a plain byte tensor that the EMS context cache stores as it stores any
    block; :meth:`read_tokens` returns dequantized values (the KV handed from prefill to decode),
    and quantizing them again gives back the same integers and scales.

    Attention reads through :meth:`gather` (dequantizing the slots it needs); the fused native
    kernels take float32 caches only, so an INT8 cache runs the PyTorch attention.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, dim: int, split: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if not 0 < split < dim:
            raise ValueError(f"latent split {split} must lie inside the slot width {dim}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dim = dim
        self.split = split
        self.compute_dtype = dtype
        self.row = self.row_bytes(dim)
        self.data = torch.zeros(num_layers, num_blocks * block_size, self.row, dtype=torch.uint8, device=device)

    @staticmethod
    def row_bytes(dim: int) -> int:
        return -(-dim // 4) * 4 + 8

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, dim: int, dtype: torch.dtype = torch.int8) -> int:
        return num_layers * block_size * Int8PagedLatentCache.row_bytes(dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def _pack(self, latent: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` values -> ``[n, row]`` bytes: INT8 values (round half even), padding, two scales."""
        x = latent.to(self.data.device, torch.float32)
        parts = (x[:, :self.split], x[:, self.split:])
        scales = torch.stack([p.abs().amax(dim=1) for p in parts], dim=1) / 127.0  # 0 for an all-zero part
        div = scales.clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.cat([torch.round(p / div[:, i:i + 1]) for i, p in enumerate(parts)], dim=1)
        out = torch.zeros(x.shape[0], self.row, dtype=torch.uint8, device=x.device)
        out[:, :self.dim] = q.clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        out[:, self.row - 8:] = scales.contiguous().view(torch.uint8)
        return out

    def _unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, row]`` bytes -> ``[n, dim]`` values in the compute dtype."""
        q = rows[:, :self.dim].contiguous().view(torch.int8).float()
        scales = rows[:, self.row - 8:].contiguous().view(torch.float32)
        q[:, :self.split] *= scales[:, :1]
        q[:, self.split:] *= scales[:, 1:]
        return q.to(self.compute_dtype)

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        self.data[layer].index_copy_(0, slots, self._pack(latent))

    def gather(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self._unpack(self.data[layer].index_select(0, slots))

    def _encode(self, kv: torch.Tensor) -> torch.Tensor:
        return self._pack(kv.reshape(-1, self.dim)).view(*kv.shape[:2], self.row)

    def _decode(self, stored: torch.Tensor) -> torch.Tensor:
        return self._unpack(stored.reshape(-1, self.row)).view(*stored.shape[:2], self.dim)


def make_cache(kv_cache_dtype: str, num_layers: int, num_blocks: int, block_size: int, dim: int, split: int,
               dtype: torch.dtype, device: torch.device | str) -> PagedLatentCache:
    """The paged cache for ``--kv-cache-dtype``: ``auto`` stores the runtime dtype, ``int8`` INT8 latents."""
    if kv_cache_dtype == "int8":
        return Int8PagedLatentCache(num_layers, num_blocks, block_size, dim, split, dtype, device)
    if kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {kv_cache_dtype!r}")
    return PagedLatentCache(num_layers, num_blocks, block_size, dim, dtype, device)


def cache_bytes_per_block(kv_cache_dtype: str, num_layers: int, block_size: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block of every layer in the cache :func:`make_cache` would build."""
    cls = Int8PagedLatentCache if kv_cache_dtype == "int8" else PagedLatentCache
    return cls.bytes_per_block(num_layers, block_size, dim, dtype)
