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
def _rmsnorm(X, RES, W, OUT, SUM, N, eps, stride_x, stride_r, stride_o, stride_s,
             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    if HAS_RES:
        xf = (xf + tl.load(RES + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)).to(dt)
        tl.store(SUM + row * stride_s + cols, xf, mask=m)
        xf = xf.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    y = (xf * (1.0 / tl.sqrt(var + eps))).to(dt)
    w = tl.load(W + cols, mask=m, other=0.0)
    tl.store(OUT + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(OUT.dtype.element_ty), mask=m)


def _check(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: input {list(x.shape)} does not end in the weight's {weight.shape[0]} values")
    return x.reshape(-1, weight.shape[0])


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` over the last dimension; same shape and dtype as ``weight * x``."""
    x2 = _check(x, weight)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        n = x2.shape[1]
        _rmsnorm[(x2.shape[0],)](x2, x2, weight, out, out, n, eps, x2.stride(0), x2.stride(0), out.stride(0),
                                 out.stride(0), HAS_RES=False, BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rmsnorm(x + residual), x + residual)`` in one pass."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rmsnorm: input {list(x.shape)} {x.dtype} and residual {list(residual.shape)} "
                         f"{residual.dtype} differ")
    x2, r2 = _check(x, weight), residual.reshape(-1, weight.shape[0])
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty_like(x2)
    if x2.shape[0]:
        n = x2.shape[1]
        _rmsnorm[(x2.shape[0],)](x2, r2, weight, out, total, n, eps, x2.stride(0), r2.stride(0), out.stride(0),
                                 total.stride(0), HAS_RES=True, BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape), total.view(x.shape)
