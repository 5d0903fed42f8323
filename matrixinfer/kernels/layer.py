"""Whole decoder layers in one native call (``layer.c``): a layer's dimensions and weights, and the
per-step metadata all layers of a step share, as the ``MiLayer`` and ``MiStep`` structs of
``matrixinfer.h``.

At decode batch sizes the per-operator dispatch of a layer costs about as much as its arithmetic,
so a CPU decode step runs each eligible layer as one call. The model describes such a layer once,
when its backend is chosen (``matrixinfer.model.deepseek.Block``); the struct holds raw pointers,
so it is rebuilt, after checking every tensor again, whenever a weight or the cache has moved.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields

import numpy as np
import torch

from matrixinfer.kernels import LIBRARY, _check, _lib, quantize_rows

ATTENTION_WEIGHTS = ("in_norm", "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o_proj", "post_norm")
MLP_WEIGHTS = ("mlp_gate", "mlp_up", "mlp_down")
MOE_WEIGHTS = ("router", "router_bias", "experts_gate_up", "experts_down")
# the projections an INT8 copy of a layer reads as W8A8 (kv_b works inside the absorbed attention,
# the norms and the router are small and steer the rest: they stay float32)
INT8_WEIGHTS = ("q_a", "q_b", "kv_a", "o_proj", "mlp_gate", "mlp_up", "mlp_down", "experts_gate_up", "experts_down")


@dataclass(frozen=True)
class LayerDims:
    """A decoder layer's dimensions and constants: ``MiLayer``'s scalar fields, by the same names."""

    hidden: int
    heads: int
    q_lora: int
    nope: int
    rope: int
    v_dim: int
    rank: int
    eps: float
    scale: float
    interleaved: bool
    mlp_inter: int = 0  # the dense MLP, or a MoE layer's shared experts (0: none)
    n_experts: int = 0  # routed experts (0: a dense layer)
    n_group: int = 1
    topk_group: int = 1
    top_k: int = 0
    moe_inter: int = 0
    norm_topk: bool = False
    scaling: float = 1.0

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight the layer reads, by ``MiLayer`` field name, with the shape it must have."""
        h, qk = self.hidden, self.nope + self.rope
        shapes = {"in_norm": (h,), "q_a": (self.q_lora, h), "q_a_norm": (self.q_lora,),
                  "q_b": (self.heads * qk, self.q_lora), "kv_a": (self.rank + self.rope, h),
                  "kv_a_norm": (self.rank,), "kv_b": (self.heads * (self.nope + self.v_dim), self.rank),
                  "o_proj": (h, self.heads * self.v_dim), "post_norm": (h,)}
        if self.mlp_inter:
            shapes.update(mlp_gate=(self.mlp_inter, h), mlp_up=(self.mlp_inter, h), mlp_down=(h, self.mlp_inter))
        if self.n_experts:
            e, i = self.n_experts, self.moe_inter
            shapes.update(router=(e, h), router_bias=(e,), experts_gate_up=(e, 2 * i, h), experts_down=(e, h, i))
        return shapes


class DecoderLayer:
    """One decoder layer as ``mi_decoder_layer`` runs it: ``x += attention(x)`` then
    ``x += MLP or MoE(x)`` on the residual stream ``x`` ``[T, hidden]`` in place.

    ``weights`` maps each name of :meth:`LayerDims.weight_shapes` to the tensor the model keeps
    (float32, contiguous, on the CPU); they are checked now and whenever one has moved. ``layer``
    is the layer's index in the paged latent cache."""

    def __init__(self, dims: LayerDims, weights: Mapping[str, torch.Tensor], layer: int) -> None:
        shapes = dims.weight_shapes()
        if set(weights) != set(shapes):
            raise ValueError(f"decoder layer weights: expected {sorted(shapes)}, got {sorted(weights)}")
        self.dims, self.layer = dims, layer
        self._weights = [(name, weights[name], shape) for name, shape in shapes.items()]
        self._tensors = [w for _, w, _ in self._weights]
        self._struct: ctypes.Structure | None = None
        self._key: tuple[int, ...] = ()
        self._held: list[torch.UntypedStorage] = []
        self._check_weights()
        self._run = _lib().mi_decoder_layer
        self.int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (int8 copy, per-row scales)

    def int8_copy(self) -> DecoderLayer:
        """This layer with INT8 copies (per output row, symmetric; W8A8 with per-token activations) of
        its projections (:data:`INT8_WEIGHTS`), taken now: a quarter of their bytes, for a pass whose
        result is only a guess (MTP drafts). The copies do not follow later in-place changes of the
        float weights (the engine never makes any); a moved weight needs a new copy."""
        twin = DecoderLayer(self.dims, {name: w for name, w, _ in self._weights}, self.layer)
        for name, w, shape in self._weights:
            if name in INT8_WEIGHTS:
                q, scale = quantize_rows(w.reshape(-1, shape[-1]))
                twin.int8[name] = (q.view(shape), scale.view(shape[:-1]))
        return twin

    def __call__(self, step: ctypes.Structure, x: torch.Tensor, cache: torch.Tensor) -> None:
        """Run the layer on ``x`` (the ``x`` :func:`native_step` checked) with ``step`` over
        ``cache``, the whole ``[layers, num_slots, rank + rope]`` paged latent cache."""
        struct = self.struct(cache)
        if x.shape[1] != self.dims.hidden:
            raise ValueError(f"decoder layer {self.layer}: x has {x.shape[1]} columns, hidden is {self.dims.hidden}")
        _raise_for(self._run(struct, step, x.data_ptr(), x.shape[0], torch.get_num_threads()), "decoder layer")

    def struct(self, cache: torch.Tensor) -> ctypes.Structure:
        """The ``MiLayer`` over ``cache``, rebuilt (and its tensors checked again) when the cache has
        moved. The weights are the tensors given, as they were when it was built: it holds their
        storage, so that a later ``.data`` assignment or ``set_`` (which nothing in the engine does:
        a backend change builds a new layer) can never leave it pointing at freed memory, and it
        does not follow one. (Checking every weight's address per call cost ~100 us of a ~2 ms
        batch-1 step on the demo model, from an interpreter the step's weights left cold.)"""
        key = (cache.data_ptr(), cache.stride(0))
        if key != self._key or self._struct is None:
            self._struct, self._key = self._build(cache), key
        return self._struct

    def _check_weights(self) -> None:
        for name, w, shape in self._weights:
            _check(f"decoder layer weight {name}", w, torch.float32)
            if tuple(w.shape) != shape:
                raise ValueError(f"decoder layer weight {name} has shape {tuple(w.shape)}, expected {shape}")

    def _build(self, cache: torch.Tensor) -> ctypes.Structure:
        self._check_weights()  # a weight moved: it may have changed dtype or device too
        d = self.dims
        _check("decoder layer cache", cache, torch.float32)
        if cache.dim() != 3 or self.layer >= cache.shape[0] or cache.shape[2] != d.rank + d.rope:
            raise ValueError(f"decoder layer {self.layer}: a cache of shape {tuple(cache.shape)}, "
                             f"[layers > {self.layer}, slots, {d.rank + d.rope}] expected")
        scalars = {f.name: (int(v) if isinstance(v, bool) else v) for f, v in zip(fields(d), astuple(d))}
        pointers = {name: w.data_ptr() for name, w, _ in self._weights}
        held = [w.untyped_storage() for w in self._tensors]
        for name, (q, scale) in self.int8.items():
            pointers[f"{name}_q"], pointers[f"{name}_s"] = q.data_ptr(), scale.data_ptr()
            held += [q.untyped_storage(), scale.untyped_storage()]
        self._held = held  # the memory the struct points into stays alive as long as it does
        return LIBRARY.structs["MiLayer"](**scalars, **pointers, cache=cache[self.layer].data_ptr())


def _raise_for(rc: int, what: str) -> None:
    if rc != 0:
        why = {-2: "out of memory", -3: "a token id or position outside the tables"}.get(rc, "unsupported routing")
        raise RuntimeError(f"native {what} failed ({why})")


class MTPDraft:
    """A DeepSeek-V3 MTP module's greedy draft step in one native call (``mi_mtp_draft``): the
    projection of the normed next-token embedding and previous hidden state, the module's block
    (``block``, over the paged cache), the output norm, and the head's argmax for the rows that
    draft. The same kernels, in the same order, as the per-operator path of the ``cpu`` backend,
    without its dispatch (several operators' worth per draft, each about as long as its arithmetic
    at one row)."""

    def __init__(self, block: DecoderLayer, embed: torch.Tensor, enorm: torch.Tensor, hnorm: torch.Tensor,
                 eh_proj: torch.Tensor, norm: torch.Tensor, head: torch.Tensor, int8_head: bool = False,
                 int8_block: bool = False) -> None:
        h = block.dims.hidden
        self.vocab = embed.shape[0]
        shapes = {"embed": (embed, (self.vocab, h)), "enorm": (enorm, (h,)), "hnorm": (hnorm, (h,)),
                  "eh_proj": (eh_proj, (h, 2 * h)), "norm": (norm, (h,)), "head": (head, (self.vocab, h))}
        for name, (w, shape) in shapes.items():
            _check(f"MTP weight {name}", w, torch.float32)
            if tuple(w.shape) != shape:
                raise ValueError(f"MTP weight {name} has shape {tuple(w.shape)}, expected {shape}")
        # int8_block: the block's projections and eh_proj from INT8 copies (DecoderLayer.int8_copy):
        # at one to a few rows a draft streams its weights from memory, and reads a quarter of them
        self.block = block.int8_copy() if int8_block else block
        self._eh_proj_q = quantize_rows(eh_proj) if int8_block else None
        self._weights = (embed, enorm, hnorm, eh_proj, norm, head)
        self._run = _lib().mi_mtp_draft
        self._sel, self._tokens = torch.empty(2, 64, dtype=torch.int64).unbind()  # (grown on demand)
        # int8_head: draft from a per-row INT8 copy of the head (a quarter of its bytes, the largest
        # read of a draft step at small batch). A draft is only a guess that verification checks, so
        # a rare near-tie resolved differently costs acceptance, never a different output.
        self.head_q: torch.Tensor | None = None
        self.head_scale: torch.Tensor | None = None
        if int8_head:
            self.head_q, self.head_scale = quantize_rows(head)
        eh_q, eh_s = (None, None) if self._eh_proj_q is None else self._eh_proj_q
        # the weights besides the block, as mi_mtp_draft and mi_spec_step read them (the tensors are kept in
        # _weights, _eh_proj_q and head_q/head_scale for this object's life)
        self.weights = LIBRARY.structs["MiMtp"](
            embed=embed.data_ptr(), enorm=enorm.data_ptr(), hnorm=hnorm.data_ptr(), eh_proj=eh_proj.data_ptr(),
            eh_proj_s=None if eh_s is None else eh_s.data_ptr(), norm=norm.data_ptr(), head=head.data_ptr(),
            head_scale=None if self.head_scale is None else self.head_scale.data_ptr(),
            eh_proj_q=None if eh_q is None else eh_q.data_ptr(),
            head_q=None if self.head_q is None else self.head_q.data_ptr(), vocab=self.vocab)

    def __call__(self, step: ctypes.Structure, next_ids: torch.Tensor, prev: torch.Tensor, rows: list[int],
                 cache: torch.Tensor, deeper: ctypes.Structure | None = None, depth: int = 1
                 ) -> tuple[torch.Tensor, list[int]]:
        """For the rows ``prev`` ``[T, hidden]`` (the previous depth's states) and ``next_ids``
        ``[T]`` (int64: the token after each row's position), with ``step`` (:func:`native_step`
        over ``prev``) over ``cache``: every row's MTP latent into the cache, and for each row in
        ``rows`` (the ones that draft) its MTP hidden state and greedy draft token. The other rows
        stop after their latent (their states would be discarded). With ``depth`` > 1 each drafting
        row drafts again from its own draft and state, one position on, ``depth - 1`` more times,
        on ``deeper``'s metadata (a ``MiStep`` of ``(depth - 1) * len(rows)`` rows, depth-major,
        sharing ``step``'s block tables). Returns the states ``[depth * len(rows), hidden]`` and the
        tokens, depth-major."""
        _check("next_ids", next_ids, torch.int64)
        _check("prev", prev, torch.float32)
        t, h = prev.shape
        if next_ids.shape != (t,) or h != self.block.dims.hidden:
            raise ValueError(f"MTP draft: {tuple(next_ids.shape)} ids for hidden states of shape {tuple(prev.shape)}")
        if depth < 1 or (depth > 1 and deeper is None):
            raise ValueError(f"MTP draft: depth {depth} needs the metadata of the deeper rows")
        ids = next_ids.numpy()  # (NumPy: a draft's few checks cost less than one torch reduction)
        if t and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ValueError(f"MTP draft: a token id outside [0, {self.vocab})")
        if any(not 0 <= r < t for r in rows):
            raise ValueError(f"MTP draft: rows {rows} outside the {t} rows")
        n = len(rows)
        if depth * n > self._tokens.shape[0]:
            self._sel, self._tokens = torch.empty(2, depth * n, dtype=torch.int64).unbind()
        sel, tokens = self._sel[:n], self._tokens[:depth * n]
        sel.numpy()[:] = rows
        out = torch.empty(depth * n, h, dtype=torch.float32)  # (a new one: callers keep the states)
        w = self.weights
        _raise_for(self._run(self.block.struct(cache), step, deeper, depth, next_ids.data_ptr(), prev.data_ptr(), t,
                             w.embed, w.enorm, w.hnorm, w.eh_proj, w.eh_proj_q, w.eh_proj_s, w.norm, w.head,
                             w.head_q, w.head_scale, self.vocab, sel.data_ptr(), n, out.data_ptr(),
                             tokens.data_ptr(), torch.get_num_threads()),
                   "MTP draft")
        return out, tokens.tolist()


def native_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                block_tables: torch.Tensor, tok_seq: torch.Tensor, tok_nkeys: torch.Tensor, block_size: int,
                num_slots: int) -> ctypes.Structure:
    """The ``MiStep`` of one decode step over the residual stream ``x`` ``[T, hidden]`` (float32,
    updated in place by each layer): rotary tables ``[T, rope / 2]``, each token's cache slot
    ``[T]`` (int64, all below ``num_slots``), the block tables ``[S, W]`` and each token's sequence
    row and key count ``[T]`` (int32). The caller keeps the tensors alive while layers run."""
    for name, t, dtype in (("x", x, torch.float32), ("cos", cos, torch.float32), ("sin", sin, torch.float32),
                           ("slots", slots, torch.int64), ("block_tables", block_tables, torch.int32),
                           ("tok_seq", tok_seq, torch.int32), ("tok_nkeys", tok_nkeys, torch.int32)):
        _check(name, t, dtype)
    n = slots.shape[0]
    if x.dim() != 2 or x.shape[0] != n or cos.shape[0] != n or sin.shape != cos.shape or tok_seq.shape != (n,) \
            or tok_nkeys.shape != (n,) or block_tables.dim() != 2:
        raise ValueError("native step: inconsistent shapes")
    if n and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
        raise ValueError("slot mapping outside the KV cache")
    return LIBRARY.structs["MiStep"](
        cos=cos.data_ptr(), sin=sin.data_ptr(), slots=slots.data_ptr(), block_tables=block_tables.data_ptr(),
        tok_seq=tok_seq.data_ptr(), tok_nkeys=tok_nkeys.data_ptr(), bt_stride=block_tables.shape[1],
        block_size=block_size)


class ModelStep:
    """A decode-sized step of the main model in one native call (``mi_model_step``): the embedding
    of the step's tokens, every decoder layer (``layers``, each a :class:`DecoderLayer`), the final
    norm, and the head's logits of the rows that sample. The same kernels, in the same order, as
    one call per layer plus the PyTorch glue between them (embedding, rotary rows, metadata
    tensors, the norm and head calls), without that glue: at batch 1 on the demo model it was
    about as long as the layers' arithmetic."""

    def __init__(self, layers: list[DecoderLayer], embed: torch.Tensor, norm: torch.Tensor, eps: float,
                 head: torch.Tensor) -> None:
        if not layers:
            raise ValueError("model step: no layers")
        h = layers[0].dims.hidden
        self.vocab = embed.shape[0]
        for name, w, shape in (("embed", embed, (self.vocab, h)), ("norm", norm, (h,)),
                               ("head", head, (self.vocab, h))):
            _check(f"model weight {name}", w, torch.float32)
            if tuple(w.shape) != shape:
                raise ValueError(f"model weight {name} has shape {tuple(w.shape)}, expected {shape}")
        if any(layer.dims.hidden != h for layer in layers):
            raise ValueError("model step: layers of different hidden sizes")
        self.layers, self.hidden_size, self.eps = layers, h, eps
        self._weights = (embed, norm, head)
        self._run = _lib().mi_model_step
        self._array: ctypes.Array[ctypes.Structure] | None = None
        self._structs: tuple[ctypes.Structure, ...] = ()
        self._rows = torch.empty(64, dtype=torch.int64)
        self._ints = torch.empty(0, dtype=torch.int64)  # speculate's integer inputs and outputs (grown on demand)
        self._ints_np = self._ints.numpy()
        self._arena = torch.empty(0, h, dtype=torch.float32)  # speculate's states, handed out in slices
        self._arena_used = 0
        self._run_spec = _lib().mi_spec_step

    def _states(self, rows: int) -> torch.Tensor:
        """``rows`` hidden-state rows that no other call writes: consecutive slices of an arena
        allocated for about fifty batch-1 steps (four wide ones) at a time; a slice a sequence
        keeps keeps its arena alive (at batch 1 a ``torch.empty`` of its own cost ~60 us of a
        step's ~3 ms, the interpreter's working set cold after the weights streamed through the
        caches)."""
        if self._arena_used + rows > self._arena.shape[0]:
            self._arena = torch.empty(max(256, 4 * rows), self.hidden_size, dtype=torch.float32)
            self._arena_used = 0
        start = self._arena_used
        self._arena_used += rows
        return self._arena[start:start + rows]

    def _layer_array(self, cache: torch.Tensor) -> ctypes.Array[ctypes.Structure]:
        structs = tuple(layer.struct(cache) for layer in self.layers)
        if self._array is None or any(a is not b for a, b in zip(structs, self._structs)):
            self._array = (LIBRARY.structs["MiLayer"] * len(structs))(*structs)  # (copies: rebuilt on a change)
            self._structs = structs
        return self._array

    def speculate(self, step: ctypes.Structure, ids: torch.Tensor, seqs: list[tuple[int, int, int]],
                  draft: MTPDraft, depth: int, cache: torch.Tensor, rope: tuple[np.ndarray, np.ndarray]
                  ) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor, list[int], int]:
        """A greedy speculative step in one native call (``mi_spec_step``): the verification of
        ``ids`` ``[T]`` (int64) at the positions ``step`` describes, where each sequence of ``seqs``
        ``(first row, rows, first position)`` owns its last verified token and then its drafts; and,
        with ``depth`` > 0, the next step's drafts by ``draft`` from the rows verified, up to
        ``depth`` deep (the rotary rows of the deeper positions from ``rope``, cos and sin tables by
        position). Returns the final-normed hidden states ``[T, hidden]``, each row's greedy token,
        each sequence's accepted drafts, the draft states ``[depth_done * S, hidden]`` and tokens
        (depth-major), and ``depth_done`` (fewer depths where a deeper position lies in a block the
        rollback frees: then 1)."""
        _check("ids", ids, torch.int64)
        t, ns = ids.shape[0], len(seqs)
        if sum(k for _, k, _ in seqs) != t or any(f < 0 or k < 1 or f + k > t for f, k, _ in seqs):
            raise ValueError(f"speculative step: sequences {seqs} do not tile the {t} rows")
        cos, sin = rope
        if cos.dtype != np.float32 or sin.shape != cos.shape or not (cos.flags.c_contiguous and sin.flags.c_contiguous):
            raise ValueError("speculative step: rotary tables must be contiguous float32 of one shape")
        # one int64 buffer: first, rows, positions [S], accepted [S], target [T], tokens [depth * S], depth_done
        need = 4 * ns + t + depth * ns + 1
        if need > self._ints.shape[0]:
            self._ints = torch.empty(2 * need, dtype=torch.int64)
            self._ints_np = self._ints.numpy()
        ints = self._ints_np
        for j, column in enumerate(zip(*seqs)):
            ints[j * ns:(j + 1) * ns] = column
        base, word = self._ints.data_ptr(), 8
        acc, tgt, tok, done = 3 * ns, 4 * ns, 4 * ns + t, 4 * ns + t + depth * ns
        h = self.hidden_size
        states = self._states(t + depth * ns)  # the verified rows' states, then the drafts' (callers keep them)
        out = states.data_ptr()
        embed, norm, head = (w.data_ptr() for w in self._weights)
        _raise_for(self._run_spec(self._layer_array(cache), len(self.layers), step, ids.data_ptr(), t, embed, norm,
                                  self.eps, head, self.vocab, ns, base, base + ns * word, base + 2 * ns * word,
                                  draft.block.struct(cache), draft.weights, depth, cos.ctypes.data, sin.ctypes.data,
                                  cos.shape[0], out, base + tgt * word, base + acc * word,
                                  out + t * h * 4 if depth else None, base + tok * word, base + done * word,
                                  torch.get_num_threads()), "speculative step")
        depth_done = int(ints[done])
        return (states[:t], ints[tgt:tgt + t].tolist(), ints[acc:acc + ns].tolist(),
                states[t:t + depth_done * ns], ints[tok:tok + depth_done * ns].tolist(), depth_done)

    def __call__(self, step: ctypes.Structure, ids: torch.Tensor, rows: list[int], cache: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the token ids ``ids`` ``[T]`` (int64) at the positions ``step`` describes (a
        :func:`native_step` over ``T`` rows) over ``cache``: the final-normed hidden states
        ``[T, hidden]`` and the logits ``[len(rows), vocab]`` of the rows ``rows``."""
        _check("ids", ids, torch.int64)
        t = ids.shape[0]
        host = ids.numpy()  # (NumPy: a step's few checks cost less than one torch reduction)
        if t and (int(host.min()) < 0 or int(host.max()) >= self.vocab):
            raise ValueError(f"model step: a token id outside [0, {self.vocab})")
        if any(not 0 <= r < t for r in rows):
            raise ValueError(f"model step: rows {rows} outside the {t} rows")
        layers = self._layer_array(cache)
        n = len(rows)
        if n > self._rows.shape[0]:
            self._rows = torch.empty(2 * n, dtype=torch.int64)
        sel = self._rows[:n]
        sel.numpy()[:] = rows
        hidden = torch.empty(t, self.hidden_size, dtype=torch.float32)
        logits = torch.empty(n, self.vocab, dtype=torch.float32)
        embed, norm, head = (w.data_ptr() for w in self._weights)
        _raise_for(self._run(layers, len(self.layers), step, ids.data_ptr(), t, embed, norm, self.eps, head,
                             self.vocab, sel.data_ptr(), n, hidden.data_ptr(), logits.data_ptr(),
                             torch.get_num_threads()), "model step")
        return hidden, logits
