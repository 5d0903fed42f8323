"""RMSNorm with the residual add fused in front, one launch for a whole ``[T, hidden]`` batch.

A pre-norm block computes ``h = x + attn(x)`` and then ``norm(h)``: two passes over the hidden
states (and two launches) in eager PyTorch, one here. Rounding follows
:class:`matrixinfer.model.layers.RMSNorm`: the sum is rounded to the input dtype, the norm is
computed in float32, rounded to the input dtype and then scaled by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm(X, RES, W, OUT, SUM, M, N, eps, stride_x, stride_r, stride_o, stride_s,
             HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    if HAS_RES:
        res = tl.load(RES + rows[:, None] * stride_r + cols[None, :], mask=m, other=0.0)
        xf = (xf + res.to(tl.float32)).to(dt)
        tl.store(SUM + rows[:, None] * stride_s + cols[None, :], xf, mask=m)
        xf = xf.to(tl.float32)
    var = tl.sum(xf * xf, 1) / N
    y = (xf * (1.0 / tl.sqrt(var + eps))[:, None]).to(dt)
    w = tl.load(W + cols, mask=cols < N, other=0.0)
    out = (w.to(tl.float32)[None, :] * y.to(tl.float32)).to(OUT.dtype.element_ty)
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :], out, mask=m)


def _launch(x2: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, total: torch.Tensor,
            eps: float, has_res: bool) -> None:
    m, n = x2.shape
    # A row per program on a GPU; the interpreter pays per program, so there a block of rows each.
    rows = 1 if x2.is_cuda else min(64, triton.next_power_of_2(m))
    _rmsnorm[(triton.cdiv(m, rows),)](x2, r2, weight, out, total, m, n, eps, x2.stride(0), r2.stride(0),
                                      out.stride(0), total.stride(0), HAS_RES=has_res, ROWS=rows,
                                      BLOCK=triton.next_power_of_2(n))


def _check(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: input {list(x.shape)} does not end in the weight's {weight.shape[0]} values")
    x2 = x.reshape(-1, weight.shape[0])
    return x2 if x2.stride(1) == 1 else x2.contiguous()  # rows may be strided (a split view), values not


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` over the last dimension; same shape and dtype as ``weight * x``."""
    x2 = _check(x, weight)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        _launch(x2, x2, weight, out, out, eps, has_res=False)
    return out.view(x.shape)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rmsnorm(x + residual), x + residual)`` in one pass."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rmsnorm: input {list(x.shape)} {x.dtype} and residual {list(residual.shape)} "
                         f"{residual.dtype} differ")
    x2, r2 = _check(x, weight), _check(residual, weight)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x2)
    if x2.shape[0]:
        _launch(x2, r2, weight, out, total, eps, has_res=True)
    return out.view(x.shape), total.view(x.shape)
