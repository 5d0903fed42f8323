"""Causal attention of the naive (expanded) MLA form over a whole flat batch, one launch per layer.

The eager path runs one ``scaled_dot_product_attention`` per prefill sequence per layer (a host-bound
loop: ~1.2 ms of host time per call measured on an H200); this kernel takes the flat batch as it
is. Sequence ``s`` has ``q_len[s]`` query rows starting at ``q_start[s]`` of the flat queries and
``k_len[s]`` keys starting at ``k_start[s]`` of the flat keys; its queries are the last ``q_len[s]``
of its ``k_len[s]`` positions (a prefix from the cache, then the new tokens), so query ``i`` sees
keys ``0 .. k_len - q_len + i``. The rotary key part is shared by all heads (MLA), so it is passed
once per key rather than expanded per head. A program takes ``BLOCK_M`` query rows of one
sequence and one head and streams its keys with an online softmax (flash attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _varlen_causal(QN, QP, KN, KP, V, OUT, Q_START, Q_LEN, K_START, K_LEN, scale,
                   stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_knt, stride_knh, stride_kpt,
                   stride_vt, stride_vh, stride_ot, stride_oh,
                   NOPE, ROPE, VD,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    mb = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q_len = tl.load(Q_LEN + s)
    k_len = tl.load(K_LEN + s)
    q0 = tl.load(Q_START + s).to(tl.int64)
    k0 = tl.load(K_START + s).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < q_len
    qpos = k_len - q_len + rows
    d = tl.arange(0, BLOCK_D)
    p = tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_V)
    dm, pm, cm = d < NOPE, p < ROPE, c < VD
    k_t = KN.dtype.element_ty
    q_n = tl.load(QN + (q0 + rows)[:, None] * stride_qnt + h * stride_qnh + d[None, :],
                  mask=rm[:, None] & dm[None, :], other=0.0).to(k_t)
    q_p = tl.load(QP + (q0 + rows)[:, None] * stride_qpt + h * stride_qph + p[None, :],
                  mask=rm[:, None] & pm[None, :], other=0.0).to(k_t)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    # Keys past this block's last query are masked for every row: stop there (0 for a block past the sequence).
    end = tl.where(mb * BLOCK_M < q_len, tl.minimum(k_len, k_len - q_len + (mb + 1) * BLOCK_M), 0)
    for n0 in range(0, end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        km = kpos < end
        k_n = tl.load(KN + (k0 + kpos)[:, None] * stride_knt + h * stride_knh + d[None, :],
                      mask=km[:, None] & dm[None, :], other=0.0)
        k_p = tl.load(KP + (k0 + kpos)[:, None] * stride_kpt + p[None, :], mask=km[:, None] & pm[None, :], other=0.0)
        sc = tl.dot(q_n, tl.trans(k_n), input_precision=PRECISION)
        sc += tl.dot(q_p, tl.trans(k_p.to(k_t)), input_precision=PRECISION)
        ok = (kpos[None, :] <= qpos[:, None]) & km[None, :]
        sc = tl.where(ok, sc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(w, 1)
        v = tl.load(V + (k0 + kpos)[:, None] * stride_vt + h * stride_vh + c[None, :],
                    mask=km[:, None] & cm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # every real row sees key 0, so l_i > 0 there
    tl.store(OUT + (q0 + rows)[:, None] * stride_ot + h * stride_oh + c[None, :], out.to(OUT.dtype.element_ty),
             mask=rm[:, None] & cm[None, :])


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def varlen_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                   v: torch.Tensor, q_lens: list[int], k_lens: list[int], scale: float,
                   device_lens: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """Causal attention for every sequence of a flat batch in one launch.

    ``q_nope`` ``[T, H, nope]`` and ``q_pe`` ``[T, H, rope]`` the queries (sequences concatenated),
    ``k_nope`` ``[K, H, nope]``, ``k_pe`` ``[K, rope]`` (shared by the heads) and ``v`` ``[K, H, v]``
    the keys and values of every sequence concatenated; ``q_lens`` / ``k_lens`` per sequence (host
    lists; each ``1 <= q_len <= k_len``). ``device_lens``: ``(q_start, q_len, k_start, k_len)`` int32
    tensors already on the device, else built here. Returns ``[T, H, v]`` in ``q_nope``'s dtype.
    """
    if len(q_lens) != len(k_lens):
        raise ValueError("varlen_prefill: q_lens and k_lens need one entry per sequence")
    t, h, nope = q_nope.shape
    kn, rope, vd = k_nope.shape[0], q_pe.shape[2], v.shape[2]
    if sum(q_lens) != t or sum(k_lens) != kn or k_pe.shape != (kn, rope) or v.shape[:2] != (kn, h) \
            or k_nope.shape[1:] != (h, nope) or q_pe.shape[:2] != (t, h):
        raise ValueError(f"varlen_prefill: shapes q_nope {list(q_nope.shape)} q_pe {list(q_pe.shape)} k_nope "
                         f"{list(k_nope.shape)} k_pe {list(k_pe.shape)} v {list(v.shape)} do not fit "
                         f"{sum(q_lens)} queries and {sum(k_lens)} keys")
    if any(not 1 <= q <= k for q, k in zip(q_lens, k_lens)):
        raise ValueError("varlen_prefill: each sequence needs 1 <= q_len <= k_len")
    for name, x in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"varlen_prefill: {name} needs contiguous last dimension")
    out = torch.empty(t, h, vd, dtype=q_nope.dtype, device=q_nope.device)
    if t == 0:
        return out
    if device_lens is None:
        q_start = [0]
        k_start = [0]
        for q, k in zip(q_lens, k_lens):
            q_start.append(q_start[-1] + q)
            k_start.append(k_start[-1] + k)
        device_lens = tuple(torch.tensor(x, dtype=torch.int32).to(q_nope.device, non_blocking=True)  # type: ignore[assignment]
                            for x in (q_start[:-1], q_lens, k_start[:-1], k_lens))
    assert device_lens is not None
    q_start_t, q_len_t, k_start_t, k_len_t = device_lens
    block_m = 16 if q_nope.device.type != "cuda" else 64
    block_n = 16 if q_nope.device.type != "cuda" else 32
    precision = "ieee" if k_nope.dtype is torch.float32 else "tf32"
    grid = (-(-max(q_lens) // block_m), len(q_lens), h)
    _varlen_causal[grid](
        q_nope, q_pe, k_nope, k_pe, v, out, q_start_t, q_len_t, k_start_t, k_len_t, scale,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        nope, rope, vd,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(nope), BLOCK_P=_pow2(rope), BLOCK_V=_pow2(vd),
        PRECISION=precision)
    return out
