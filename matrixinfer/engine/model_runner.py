"""Runs one scheduled step on the model: builds the flat batch, attention metadata and block
tables, executes the forward pass over the paged latent KV cache, and returns the logits of the
rows that sample a token; with speculation also the verification pass (drafts appended to a
sequence's chunk) and the MTP module's passes (:mod:`matrixinfer.engine.speculative`)."""

from __future__ import annotations

import ctypes
import logging
from typing import cast

import numpy as np
import torch

from matrixinfer import envs
from matrixinfer.config import EngineConfig
from matrixinfer.engine.sequence import Sequence
from matrixinfer.engine.step_inputs import StepInputs
from matrixinfer.kernels.layer import ModelStep, MTPDraft
from matrixinfer.model.attention import (
    AttentionMetadata,
    PagedLatentCache,
    block_slots,
    cache_bytes_per_block,
    make_cache,
)
from matrixinfer.model.deepseek import Block, DeepseekForCausalLM
from matrixinfer.model.layers import Linear

log = logging.getLogger(__name__)


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), or a conservative 4 GiB where it is unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _chunk_ids(seq: Sequence, n: int, drafts: dict[str, list[int]] | None) -> list[int]:
    """The token ids of ``seq``'s next ``n`` positions: its own, then its draft tokens if any."""
    d = drafts.get(seq.request_id) if drafts else None
    start = seq.num_computed
    return seq.token_ids(start, n - len(d)) + d if d else seq.token_ids(start, n)


class ModelRunner:
    """Owns the model and its KV cache on one device."""

    def __init__(self, model: DeepseekForCausalLM, cfg: EngineConfig, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.block_size = cfg.block_size
        dtype = model.model.embed_tokens.weight.dtype
        mc = model.config
        per_block = cache_bytes_per_block(cfg.kv_cache_dtype, model.num_cache_layers, cfg.block_size,
                                          mc.kv_cache_dim, dtype)
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * cfg.kv_cache_fraction)
        else:
            budget = int(available_host_memory() * cfg.kv_cache_fraction)
        self.num_blocks = budget // per_block
        if self.num_blocks < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds {self.num_blocks} blocks of {per_block} bytes; "
                             "raise --kv-cache-memory or --kv-cache-fraction")
        self.kv_cache = make_cache(cfg.kv_cache_dtype, model.num_cache_layers, self.num_blocks, cfg.block_size,
                                   mc.kv_cache_dim, mc.kv_lora_rank, dtype, device)
        self.kv_cache_bytes = self.num_blocks * per_block
        self.hidden: torch.Tensor | None = None  # the last execute()'s final hidden states
        self._inputs: StepInputs | None = None  # the one-call step's inputs (see run)
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s) on %s", self.num_blocks, cfg.block_size,
                 self.kv_cache_bytes / 2**20, "int8" if cfg.kv_cache_dtype == "int8" else dtype, device)
        if device.type == "cpu":
            torch.set_num_threads(envs.threads() or torch.get_num_threads())

    @torch.inference_mode()
    def execute(self, chunks: list[tuple[Sequence, int]]) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Compute ``n`` new tokens for each ``(seq, n)``; return logits for sequences that are now
        fully computed (they sample their next token), in the same order as the returned list. The
        step's hidden states stay in :attr:`hidden` (MTP speculation keeps some)."""
        rows, samplers = [], []
        offset = 0
        for seq, n in chunks:
            offset += n
            if seq.num_computed + n == seq.num_tokens:
                rows.append(offset - 1)
                samplers.append(seq)
        hidden, _, logits = self.run(chunks, None, rows)
        self.hidden = hidden
        return logits, samplers

    @torch.inference_mode()
    def run(self, chunks: list[tuple[Sequence, int]], drafts: dict[str, list[int]] | None,
            rows: list[int]) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """:meth:`forward` and the logits of its rows ``rows`` (None for none): in one native call
        where the step is decode-sized and the model has one (:meth:`DeepseekForCausalLM.native_model_step`),
        else the forward pass and then :meth:`logits`."""
        one_call = self._one_call(chunks, drafts, rows)
        if one_call is not None:
            return one_call
        hidden, starts = self.forward(chunks, drafts)
        return hidden, starts, (self.logits(hidden, rows) if rows else None)

    def _one_call(self, chunks: list[tuple[Sequence, int]], drafts: dict[str, list[int]] | None,
                  rows: list[int]) -> tuple[torch.Tensor, list[int], torch.Tensor | None] | None:
        """:meth:`run` as one native call, or None where it does not apply (see :meth:`_one_call_inputs`)."""
        found = self._one_call_inputs(chunks, drafts)
        if found is None:
            return None
        step_model, step, ids_t, starts = found
        hidden, logits = step_model(step, ids_t, rows, self.kv_cache.data)
        return hidden, starts, (logits if rows else None)

    def _one_call_inputs(self, chunks: list[tuple[Sequence, int]], drafts: dict[str, list[int]] | None
                         ) -> tuple[ModelStep, ctypes.Structure, torch.Tensor, list[int]] | None:
        """The one-call step's model, ``MiStep``, token ids and each chunk's first row, or None where
        it does not apply (a prompt-sized batch, a batch the absorbed attention does not take, a
        cache or model the call cannot read)."""
        cache = self.kv_cache
        if self.device.type != "cpu" or not isinstance(cache, PagedLatentCache) \
                or cache.data.dtype is not torch.float32:
            return None
        step_model = self.model.native_model_step()
        if step_model is None or sum(n for _, n in chunks) > Linear.small_rows:
            return None
        q_lens = [n for _, n in chunks]
        attn = cast(Block, self.model.model.layers[0]).self_attn
        if not attn.absorbed_for_lens(q_lens, [seq.num_computed + n for seq, n in chunks]):
            return None
        entries, starts, first = [], [], 0
        for seq, n in chunks:
            entries.append((seq, seq.num_computed, _chunk_ids(seq, n, drafts)))
            starts.append(first)
            first += n
        if self._inputs is None or self._inputs.num_slots != cache.data.shape[1]:
            self._inputs = StepInputs(self.model.rope, self.block_size, cache.data.shape[1], Linear.small_rows)
        step, ids_t, _ = self._inputs.build(entries)
        return step_model, step, ids_t, starts

    @torch.inference_mode()
    def speculate(self, chunks: list[tuple[Sequence, int]], drafts: dict[str, list[int]], draft: MTPDraft,
                  depth: int) -> tuple[torch.Tensor, list[int], list[int], list[int], torch.Tensor, list[int], int
                                       ] | None:
        """A greedy verification of ``drafts`` (every chunk a decoding sequence's last token and its
        drafts) and the next step's drafts in one native call (:meth:`ModelStep.speculate`), or
        None where the one-call step does not apply. Returns the hidden states, each chunk's first
        row, each row's greedy token, each chunk's accepted drafts, and the drafts' states, tokens
        and depth (see :meth:`ModelStep.speculate`)."""
        found = self._one_call_inputs(chunks, drafts)
        if found is None:
            return None
        step_model, step, ids_t, starts = found
        assert self._inputs is not None
        seqs = [(first, n, seq.num_computed) for (seq, n), first in zip(chunks, starts)]
        rope = self._inputs.rope_tables(max(p + n for _, n, p in seqs) + depth)
        hidden, target, accepted, states, tokens, done = step_model.speculate(step, ids_t, seqs, draft, depth,
                                                                              self.kv_cache.data, rope)
        return hidden, starts, target, accepted, states, tokens, done

    @torch.inference_mode()
    def forward(self, chunks: list[tuple[Sequence, int]],
                drafts: dict[str, list[int]] | None = None) -> tuple[torch.Tensor, list[int]]:
        """The main model over ``n`` new tokens of each ``(seq, n)``, the last ``len(drafts[id])`` of
        them the sequence's draft tokens (a verification: query length K + 1 over the paged cache);
        returns the final hidden states ``[T, hidden]`` and each chunk's first row."""
        ids: list[int] = []
        positions: list[int] = []
        q_lens, ctx_lens, starts = [], [], []
        for seq, n in chunks:
            start = seq.num_computed
            starts.append(len(ids))
            ids.extend(_chunk_ids(seq, n, drafts))
            positions.extend(range(start, start + n))
            q_lens.append(n)
            ctx_lens.append(start + n)
        meta, pos = self._metadata([seq for seq, _ in chunks], q_lens, ctx_lens, positions)
        hidden = self.model(torch.tensor(ids).to(self.device, non_blocking=True), pos, meta, self.kv_cache)
        return hidden, starts

    def mtp_batch(self, rows: list[tuple[Sequence, int, list[int], torch.Tensor]]
                  ) -> tuple[list[int], AttentionMetadata, torch.Tensor, torch.Tensor, list[int]]:
        """The flat batch of an MTP pass over ``rows`` (see :meth:`mtp`): token ids, metadata,
        positions, the hidden states it combines with, and each entry's last row."""
        ids: list[int] = []
        positions: list[int] = []
        q_lens, ctx_lens, last = [], [], []
        for _, start, next_ids, _ in rows:
            ids.extend(next_ids)
            positions.extend(range(start, start + len(next_ids)))
            q_lens.append(len(next_ids))
            ctx_lens.append(start + len(next_ids))
            last.append(len(ids) - 1)
        meta, pos = self._metadata([seq for seq, _, _, _ in rows], q_lens, ctx_lens, positions)
        prev = rows[0][3] if len(rows) == 1 else torch.cat([h for _, _, _, h in rows])
        return ids, meta, pos, prev, last

    @torch.inference_mode()
    def mtp(self, rows: list[tuple[Sequence, int, list[int], torch.Tensor]],
            batch: tuple[list[int], AttentionMetadata, torch.Tensor, torch.Tensor, list[int]] | None = None
            ) -> torch.Tensor:
        """The MTP module over consecutive positions of each ``(seq, start, next_ids, hidden)``: row i
        is position ``start + i``, combining the main model's (or the previous draft's) hidden state
        ``hidden[i]`` with the embedding of the token after it, ``next_ids[i]``; its latent goes to
        the MTP layer of the paged cache. Returns the MTP hidden state of each entry's last row.
        ``batch``: :meth:`mtp_batch` of ``rows`` when the caller has built it already."""
        ids, meta, pos, prev, last = batch if batch is not None else self.mtp_batch(rows)
        dev = self.device
        out = self.model.mtp_forward(torch.tensor(ids).to(dev, non_blocking=True), pos, prev, meta, self.kv_cache)
        return out if len(last) == out.shape[0] else out[torch.tensor(last, device=dev)]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int] | None = None, mtp: bool = False) -> torch.Tensor:
        """Vocabulary logits of ``hidden`` (its ``rows`` only, when given) from the main head, or
        from the MTP module's head."""
        if rows is not None and len(rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self.model.mtp_logits(hidden) if mtp else self.model.compute_logits(hidden)

    def _metadata(self, seqs: list[Sequence], q_lens: list[int], ctx_lens: list[int],
                  positions: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """The paged batch's metadata (what :meth:`AttentionMetadata.build` computes, here from host
        arrays in a handful of tensor operations: at decode batch sizes, and twice or more per
        speculative step, the per-step overhead is a visible share of the step) and the positions."""
        width = max(len(seq.block_table) for seq in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for row, seq in zip(tables, seqs):
            row[:len(seq.block_table)] = seq.block_table
        pos = np.asarray(positions, dtype=np.int64)
        seq_idx = np.repeat(np.arange(len(seqs), dtype=np.int32), q_lens)
        slots = block_slots(torch.from_numpy(tables[seq_idx, pos // self.block_size]), torch.from_numpy(pos),
                            self.block_size)
        dev = self.device
        meta = AttentionMetadata(q_lens, ctx_lens, slots.to(dev, non_blocking=True),
                                 block_tables=torch.from_numpy(tables).to(dev, non_blocking=True),
                                 block_size=self.block_size,
                                 tok_seq=torch.from_numpy(seq_idx).to(dev, non_blocking=True),
                                 tok_nkeys=torch.from_numpy((pos + 1).astype(np.int32)).to(dev, non_blocking=True))
        return meta, torch.from_numpy(pos).to(dev, non_blocking=True)
