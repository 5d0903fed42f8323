"""The inputs of a one-call step (the main model's decode-sized step, :class:`~matrixinfer.kernels.layer.ModelStep`,
and the MTP draft step), built from Python integers into buffers allocated once.

A draft step at batch 1 is one to a few rows. Building its metadata with tensor operations (the
flat batch's slots, block tables, key counts and rotary rows, a dozen torch calls each a few
microseconds when warm) cost, inside the engine where the weights streamed by every step have
evicted the interpreter's and torch's working set, 0.3-0.4 ms per draft: about half the MTP
module's own arithmetic, twice per speculative step (measured on the demo model, one thread).
Here each row's slot, key count and sequence row are computed from the sequence's block table in
Python and written through NumPy views of persistent tensors; the rotary rows are copied from a
cos/sin table by position filled by :meth:`RotaryEmbedding.cos_sin` itself (the same values); the
``MiStep`` struct pointing at the buffers is built once (again only when a buffer grows). The
main model's step at decode sizes paid the same per step (its metadata, rotary rows and token
tensor: ~0.4 ms of a 3 ms step at batch 1), and takes its inputs from an instance of its own.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from matrixinfer.engine.sequence import Sequence
from matrixinfer.kernels.layer import native_step
from matrixinfer.model.layers import RotaryEmbedding

ROPE_TABLE = 4096  # positions of the first cos/sin table (doubled when a longer sequence drafts)


class StepInputs:
    """Slots, block tables, key counts, rotary rows and token ids of up to ``rows`` rows of a step."""

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
        # the deeper drafts' rows (one position on per depth, depth-major; see MTPDraft)
        self.slots2 = torch.zeros(rows, dtype=torch.int64)
        self.tok_seq2 = torch.zeros(rows, dtype=torch.int32)
        self.tok_nkeys2 = torch.zeros(rows, dtype=torch.int32)
        self.cos2 = torch.zeros(rows, half, dtype=torch.float32)
        self.sin2 = torch.zeros(rows, half, dtype=torch.float32)
        self._np = {name: getattr(self, name).numpy() for name in ("slots", "tok_seq", "tok_nkeys", "ids", "cos",
                                                                   "sin", "tables", "slots2", "tok_seq2",
                                                                   "tok_nkeys2", "cos2", "sin2")}
        self._cos_table = self._sin_table = np.zeros((0, half), dtype=np.float32)
        self._step: ctypes.Structure | None = None
        self._deeper: ctypes.Structure | None = None

    def build(self, rows: list[tuple[Sequence, int, list[int]]], depth: int = 1
              ) -> tuple[ctypes.Structure, torch.Tensor, ctypes.Structure | None]:
        """The ``MiStep`` and the next-token ids ``[T]`` of ``rows``: per ``(seq, start, next_ids)``,
        positions ``start, start + 1, ...`` (one per id) of ``seq``, whose blocks must be in its
        block table; with ``depth`` > 1 also the ``MiStep`` of the deeper drafts (each entry's
        ``depth - 1`` positions after its last, depth-major), or None where one of those positions
        has no block yet (then only the first depth can be drafted now). The result points into
        this object's buffers: valid until the next call."""
        t = sum(len(ids) for _, _, ids in rows)
        width = max(len(seq.block_table) for seq, _, _ in rows)
        if t > self.rows or len(rows) > self.rows:
            raise ValueError(f"step inputs: {t} rows of {len(rows)} sequences, at most {self.rows}")
        self.rope_tables(max(start + len(ids) for _, start, ids in rows) + depth - 1)
        if width > self.tables.shape[1]:
            self.tables = torch.zeros(self.rows, max(width, 2 * self.tables.shape[1]), dtype=torch.int32)
            self._np["tables"] = self.tables.numpy()
            self._step = self._deeper = None
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
                raise ValueError(f"step inputs: {seq.request_id} at positions {start}..{start + k - 1} "
                                 f"past its {len(table)} blocks") from None
            j += k
        slot_max = int(n["slots"][:t].max()) if t else 0
        if slot_max >= self.num_slots:
            raise ValueError(f"step inputs: slot {slot_max} outside the KV cache's {self.num_slots} slots")
        if self._step is None:
            self._step = native_step(torch.zeros(self.rows, 1), self.cos, self.sin, self.slots, self.tables,
                                     self.tok_seq, self.tok_nkeys, bs, self.num_slots)
        return self._step, self.ids[:t], self._build_deeper(rows, depth) if depth > 1 else None

    def _build_deeper(self, rows: list[tuple[Sequence, int, list[int]]], depth: int) -> ctypes.Structure | None:
        n, bs, k = self._np, self.block_size, len(rows)
        if (depth - 1) * k > self.rows:
            return None
        for d in range(1, depth):
            for i, (seq, start, ids) in enumerate(rows):
                p, j = start + len(ids) - 1 + d, (d - 1) * k + i
                b = p // bs
                if b >= len(seq.block_table):
                    return None  # not reserved yet: the next step's propose drafts this depth
                slot = seq.block_table[b] * bs + p % bs
                if not 0 <= slot < self.num_slots:
                    raise ValueError(f"step inputs: slot {slot} outside the KV cache's {self.num_slots} slots")
                n["slots2"][j] = slot
                n["tok_seq2"][j] = i
                n["tok_nkeys2"][j] = p + 1
                n["cos2"][j] = self._cos_table[p]
                n["sin2"][j] = self._sin_table[p]
        if self._deeper is None:
            self._deeper = native_step(torch.zeros(self.rows, 1), self.cos2, self.sin2, self.slots2, self.tables,
                                       self.tok_seq2, self.tok_nkeys2, bs, self.num_slots)
        return self._deeper

    def rope_tables(self, top: int) -> tuple[np.ndarray, np.ndarray]:
        """The cos and sin tables by position ``[positions, rope / 2]``, covering at least ``top``
        positions (grown if needed)."""
        if top > self._cos_table.shape[0]:
            self._grow_rope(top)
        return self._cos_table, self._sin_table

    def _grow_rope(self, top: int) -> None:
        size = max(ROPE_TABLE, 2 * self._cos_table.shape[0])
        while size < top:
            size *= 2
        cos, sin = self.rope.cos_sin(torch.arange(size))
        self._cos_table = cos.float().contiguous().numpy()
        self._sin_table = sin.float().contiguous().numpy()
