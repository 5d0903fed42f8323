"""The one-call MTP draft step's inputs, built from Python integers into buffers allocated once.

A draft step at batch 1 is one to a few rows. Building its metadata with tensor operations (the
flat batch's slots, block tables, key counts and rotary rows, a dozen torch calls each a few
microseconds when warm) cost, inside the engine where the weights streamed by every step have
evicted the interpreter's and torch's working set, 0.3-0.4 ms per draft: about half the MTP
module's own arithmetic, twice per speculative step (measured on the demo model, one thread).
Here each row's slot, key count and sequence row are computed from the sequence's block table in
Python and written through NumPy views of persistent tensors; the rotary rows are copied from a
cos/sin table by position filled by :meth:`RotaryEmbedding.cos_sin` itself (the same values); the
``MiStep`` struct pointing at the buffers is built once (again only when a buffer grows).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from matrixinfer.engine.sequence import Sequence
from matrixinfer.kernels.layer import native_step
from matrixinfer.model.layers import RotaryEmbedding

ROPE_TABLE = 4096  # positions of the first cos/sin table (doubled when a longer sequence drafts)


class DraftInputs:
    """Slots, block tables, key counts, rotary rows and token ids of up to ``rows`` draft rows."""

    def __init__(self, rope: RotaryEmbedding, block_size: int, num_slots: int, rows: int) -> None:
        self.rope, self.block_size, self.num_slots, self.rows = rope, block_size, num_slots, rows
        half = rope.cos_sin(torch.zeros(1, dtype=torch.int64))[0].shape[1]
        self.slots = torch.zeros(rows, dtype=torch.int64)
        self.tok_seq = torch.zeros(rows, dtype=torch.int32)
        self.tok_nkeys = torch.zeros(rows, dtype=torch.int32)
        self.ids = torch.zeros(rows, dtype=torch.int64)
        self.cos = torch.zeros(rows, half, dtype=torch.float32)
        self.sin = torch.zeros(rows, half, dtype=torch.float32)
        self.tables = torch.zeros(rows, 1, dtype=torch.int32)
        self._np = {name: getattr(self, name).numpy() for name in ("slots", "tok_seq", "tok_nkeys", "ids", "cos",
                                                                   "sin", "tables")}
        self._cos_table = self._sin_table = np.zeros((0, half), dtype=np.float32)
        self._step: ctypes.Structure | None = None

    def build(self, rows: list[tuple[Sequence, int, list[int]]]) -> tuple[ctypes.Structure, torch.Tensor]:
        """The ``MiStep`` and the next-token ids ``[T]`` of ``rows``: per ``(seq, start, next_ids)``,
        positions ``start, start + 1, ...`` (one per id) of ``seq``, whose blocks must be in its
        block table. The result points into this object's buffers: valid until the next call."""
        t = sum(len(ids) for _, _, ids in rows)
        width = max(len(seq.block_table) for seq, _, _ in rows)
        if t > self.rows or len(rows) > self.rows:
            raise ValueError(f"draft inputs: {t} rows of {len(rows)} sequences, at most {self.rows}")
        top = max(start + len(ids) for _, start, ids in rows)
        if top > self._cos_table.shape[0]:
            self._grow_rope(top)
        if width > self.tables.shape[1]:
            self.tables = torch.zeros(self.rows, max(width, 2 * self.tables.shape[1]), dtype=torch.int32)
            self._np["tables"] = self.tables.numpy()
            self._step = None
        n = self._np
        bs, j = self.block_size, 0
        for i, (seq, start, ids) in enumerate(rows):
            table = seq.block_table
            n["tables"][i, :len(table)] = table
            k = len(ids)
            n["ids"][j:j + k] = ids
            n["cos"][j:j + k] = self._cos_table[start:start + k]
            n["sin"][j:j + k] = self._sin_table[start:start + k]
            n["tok_seq"][j:j + k] = i
            n["tok_nkeys"][j:j + k] = range(start + 1, start + k + 1)
            try:
                n["slots"][j:j + k] = [table[p // bs] * bs + p % bs for p in range(start, start + k)]
            except IndexError:
                raise ValueError(f"draft inputs: {seq.request_id} drafts at positions {start}..{start + k - 1} "
                                 f"past its {len(table)} blocks") from None
            j += k
        slot_max = int(n["slots"][:t].max()) if t else 0
        if slot_max >= self.num_slots:
            raise ValueError(f"draft inputs: slot {slot_max} outside the KV cache's {self.num_slots} slots")
        if self._step is None:
            self._step = native_step(torch.zeros(self.rows, 1), self.cos, self.sin, self.slots, self.tables,
                                     self.tok_seq, self.tok_nkeys, bs, self.num_slots)
        return self._step, self.ids[:t]

    def _grow_rope(self, top: int) -> None:
        size = max(ROPE_TABLE, 2 * self._cos_table.shape[0])
        while size < top:
            size *= 2
        cos, sin = self.rope.cos_sin(torch.arange(size))
        self._cos_table = cos.float().contiguous().numpy()
        self._sin_table = sin.float().contiguous().numpy()
