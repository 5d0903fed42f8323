"""Paged latent MLA attention in the absorbed form, one launch per layer per step (plus a small
combine launch when the keys are split).

Each query token ``t`` attends, in the latent space, to the first ``tok_nkeys[t]`` latents of its
sequence ``tok_seq[t]``, read from the layer's slot table through the block table: the inputs of
the native CPU kernel (``kernels/paged_mla.c``), so the same metadata drives both. The query is
``[q_nope W_UK ; rope(q_pe)]`` ``[T, H, R + P]``; the output is the latent ``[T, H, R]`` that
``W_UV`` turns into per-head values. All heads of a token share its keys (MQA over the latent),
so a program takes a block of heads and reads each key once for all of them.

With few tokens (batch 1) a program per (token, head block) leaves most of a GPU idle, so the keys
are cut into ``num_splits`` ranges, each program keeping a running max and sum (online softmax)
and writing its partial output and log-sum-exp; :func:`_combine` merges them. The design follows
the flash-decoding kernels of SGLang's Triton backend; the code is ours.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_decode_split(Q, KV, BT, TOK_SEQ, TOK_NKEYS, OUT_P, LSE, scale,
                      stride_qt, stride_qh, stride_kv, stride_bt, stride_ot, stride_oh, stride_os,
                      stride_lt, stride_lh,
                      H, R, P, BLOCK_SIZE, KEYS_PER_SPLIT,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                      PRECISION: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq = tl.load(TOK_SEQ + t).to(tl.int64)
    nkeys = tl.load(TOK_NKEYS + t)
    start = split * KEYS_PER_SPLIT
    end = tl.minimum(start + KEYS_PER_SPLIT, nkeys)
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    hm, rm, pm = heads < H, r < R, p < P
    q_row = Q + t * stride_qt + heads[:, None] * stride_qh
    kv_t = KV.dtype.element_ty
    q_lat = tl.load(q_row + r[None, :], mask=hm[:, None] & rm[None, :], other=0.0).to(kv_t)
    q_pe = tl.load(q_row + R + p[None, :], mask=hm[:, None] & pm[None, :], other=0.0).to(kv_t)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        km = pos < end
        block = tl.load(BT + seq * stride_bt + pos // BLOCK_SIZE, mask=km, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        k_row = KV + slot[:, None] * stride_kv
        k_lat = tl.load(k_row + r[None, :], mask=km[:, None] & rm[None, :], other=0.0)
        k_pe = tl.load(k_row + R + p[None, :], mask=km[:, None] & pm[None, :], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=PRECISION)
        s = tl.where(km[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.dot(w.to(kv_t), k_lat, input_precision=PRECISION)
        m_i = m_new
    has = l_i > 0  # an empty split (past the sequence's keys) writes 0 with log-sum-exp -inf
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    o_ptr = OUT_P + t * stride_ot + heads[:, None] * stride_oh + split * stride_os + r[None, :]
    tl.store(o_ptr, out.to(OUT_P.dtype.element_ty), mask=hm[:, None] & rm[None, :])
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(LSE + t * stride_lt + heads * stride_lh + split, lse, mask=hm)


@triton.jit
def _combine(O_PART, LSE, OUT, S, R, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
             BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    r = tl.arange(0, BLOCK_R)
    sm, rm = s < S, r < R
    lse = tl.load(LSE + t * stride_lt + h * stride_lh + s, mask=sm, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # the first split is never empty, so the max is finite
    o = tl.load(O_PART + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + r[None, :],
                mask=sm[:, None] & rm[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + t * stride_ot + h * stride_oh + r, out.to(OUT.dtype.element_ty), mask=rm)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def num_splits_for(num_tokens: int, head_blocks: int, max_keys: int, block_n: int, target_programs: int) -> int:
    """How many key ranges each (token, head block) is cut into: enough programs to fill
    ``target_programs`` (a few per streaming multiprocessor), never a range under ``block_n`` keys."""
    want = -(-target_programs // max(1, num_tokens * head_blocks))
    return max(1, min(want, -(-max_keys // block_n)))


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting only costs time


def mla_decode(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, tok_seq: torch.Tensor,
               tok_nkeys: torch.Tensor, rank: int, block_size: int, scale: float, max_keys: int,
               num_splits: int | None = None) -> torch.Tensor:
    """Absorbed MLA attention over a paged cache.

    ``q`` ``[T, H, rank + rope]`` absorbed queries; ``kv`` ``[num_slots, rank + rope]`` the layer's
    slot table; ``block_tables`` ``[S, W]`` int32; ``tok_seq`` / ``tok_nkeys`` ``[T]`` int32 each
    token's sequence row and key count; ``max_keys`` an upper bound of ``tok_nkeys`` known on the
    host (no device sync). Returns the latent output ``[T, H, rank]`` in ``q``'s dtype.
    """
    if q.dim() != 3 or kv.dim() != 2 or q.shape[2] != kv.shape[1]:
        raise ValueError(f"mla_decode: queries {list(q.shape)} and cache table {list(kv.shape)} disagree "
                         "(expected [T, H, D] and [slots, D])")
    if not 0 < rank < kv.shape[1]:
        raise ValueError(f"mla_decode: latent rank {rank} must lie inside the slot width {kv.shape[1]}")
    t, h, d = q.shape
    if kv.stride(1) != 1 or q.stride(2) != 1:
        raise ValueError("mla_decode: the cache table and the queries need contiguous rows")
    rope = d - rank
    block_h = _pow2(min(h, 64))
    block_n = 32
    head_blocks = -(-h // block_h)
    if num_splits is None:
        num_splits = num_splits_for(t, head_blocks, max_keys, block_n, _target_programs(q.device))
    keys_per_split = -(-max(1, max_keys) // num_splits)
    keys_per_split = -(-keys_per_split // block_n) * block_n
    out = torch.empty(t, h, rank, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    part = out.view(t, h, 1, rank) if num_splits == 1 else torch.empty(t, h, num_splits, rank, dtype=torch.float32,
                                                                       device=q.device)
    lse = torch.empty(t, h, num_splits, dtype=torch.float32, device=q.device)
    precision = "ieee" if kv.dtype is torch.float32 else "tf32"
    _mla_decode_split[(t, head_blocks, num_splits)](
        q, kv, block_tables, tok_seq, tok_nkeys, part, lse, scale,
        q.stride(0), q.stride(1), kv.stride(0), block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        h, rank, rope, block_size, keys_per_split,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=_pow2(rank), BLOCK_P=_pow2(rope), PRECISION=precision)
    if num_splits > 1:
        _combine[(t, h)](part, lse, out, num_splits, rank, part.stride(0), part.stride(1), part.stride(2),
                         lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                         BLOCK_S=_pow2(num_splits, 2), BLOCK_R=_pow2(rank))
    return out
