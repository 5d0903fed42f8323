"""The MLA latent of each new token written into the paged cache in one launch: RMSNorm of the
compressed KV, RoPE of the shared rope key, the store at the token's cache slot.

Eager PyTorch spends about eight launches on this per layer (the norm, the rotation's slices,
products and concatenation, the concatenation of the two parts, the indexed copy). Rounding
follows :class:`~matrixinfer.model.layers.RMSNorm` and ``RotaryEmbedding.rotate`` (each product
rounded to the input dtype). The rotated key is stored as ``rotate`` returns it: the two halves
concatenated, whether the checkpoint's rotation is interleaved or not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_prolog(KV, W, COS, SIN, SLOTS, TABLE, eps, stride_kv, stride_cos, stride_tab, R, HALF,
               INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    x = tl.load(KV + t * stride_kv + r, mask=rm, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    y = (xf * (1.0 / tl.sqrt(tl.sum(xf * xf, 0) / R + eps))).to(dt)
    w = tl.load(W + r, mask=rm, other=0.0)
    out_t = TABLE.dtype.element_ty
    slot = tl.load(SLOTS + t).to(tl.int64)
    row = TABLE + slot * stride_tab
    tl.store(row + r, (w.to(tl.float32) * y.to(tl.float32)).to(dt).to(out_t), mask=rm)
    i = tl.arange(0, BLOCK_H)
    im = i < HALF
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    x1 = tl.load(KV + t * stride_kv + R + i1, mask=im, other=0.0).to(tl.float32)
    x2 = tl.load(KV + t * stride_kv + R + i2, mask=im, other=0.0).to(tl.float32)
    c = tl.load(COS + t * stride_cos + i, mask=im, other=0.0).to(dt).to(tl.float32)
    s = tl.load(SIN + t * stride_cos + i, mask=im, other=0.0).to(dt).to(tl.float32)
    lo = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    hi = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    tl.store(row + R + i, lo.to(dt).to(out_t), mask=im)
    tl.store(row + R + HALF + i, hi.to(dt).to(out_t), mask=im)


def mla_kv_prolog(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  interleaved: bool, slots: torch.Tensor, table: torch.Tensor) -> None:
    """Write ``[norm(kv[:, :R]) * weight ; rope(kv[:, R:])]`` of each token to ``table[slots[t]]``.

    ``kv`` ``[T, R + P]`` (``kv_a_proj_with_mqa``'s output), ``weight`` ``[R]``, ``cos``/``sin``
    ``[T, P/2]``, ``slots`` ``[T]`` cache slots, ``table`` ``[num_slots, R + P]`` the layer's cache.
    """
    t, d = kv.shape
    rank = weight.shape[0]
    rope = d - rank
    if table.dim() != 2 or table.shape[1] != d or rope <= 0 or rope % 2 or cos.shape != (t, rope // 2) \
            or sin.shape != cos.shape or slots.shape != (t,):
        raise ValueError(f"mla_kv_prolog: kv {list(kv.shape)}, weight {list(weight.shape)}, cos {list(cos.shape)}, "
                         f"slots {list(slots.shape)} and cache table {list(table.shape)} disagree")
    if kv.stride(1) != 1 or table.stride(1) != 1:
        raise ValueError("mla_kv_prolog: kv and the cache table need contiguous rows")
    cos, sin = cos.contiguous(), sin.contiguous()
    if t:
        _kv_prolog[(t,)](kv, weight, cos, sin, slots, table, eps, kv.stride(0), cos.stride(0), table.stride(0),
                         rank, rope // 2, INTERLEAVED=interleaved, BLOCK_R=triton.next_power_of_2(rank),
                         BLOCK_H=max(2, triton.next_power_of_2(rope // 2)))
