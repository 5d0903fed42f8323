"""INT8 arithmetic shared by the runtime modules and the quantizer: symmetric per-token activation
quantization, per-output-channel weight quantization with a clipping ratio, the INT8 x INT8 -> INT32
matrix product, and the block Hadamard rotation.

One definition of each, so the calibrated model and the served model compute the same thing. The
rounding matches the native kernels (``kernels/linear_w8a8.c``): ``round_half_even(x * (127 / amax))``
clamped to [-127, 127] (-128 is never used, so ``-q`` is always representable).

``int8_mm`` picks the integer product per device: ``torch._int_mm`` on CUDA where the shapes allow it,
and on the CPU a float32 product of the integer values, because ``torch._int_mm`` on the CPU is a
reference loop (``benchmarks/int8_linear.py`` prints its time; 10-60x slower than the float product
here). The float product is exact while every accumulated sum stays below 2**24 and otherwise
rounds at 6e-8 relative, far below the quantization error. Decode-sized CPU batches do not come
here: the native kernel runs them (:class:`matrixinfer.model.layers.Int8Linear`).
"""

from __future__ import annotations

import functools
import math

import torch

QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) symmetric INT8: ``q [.., K]`` int8 and ``scale [..]`` float32 with
    ``x ~= q * scale[..., None]``. An all-zero row gets scale 0 and zeros."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    inv = QMAX / amax.clamp(min=1e-30)
    q = torch.round(xf * inv[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


def quantize_weight(w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric INT8 of ``w [.., out, in]`` with the scale ``clip * amax / 127``
    (``clip`` < 1 saturates the largest values to resolve the rest more finely; a tensor broadcasts
    over the leading dims). Returns ``q`` int8 and ``scale [.., out, 1]`` float32."""
    wf = w.float()
    clip_t = torch.as_tensor(clip, dtype=torch.float32, device=wf.device)
    amax = wf.abs().amax(dim=-1, keepdim=True) * clip_t.reshape(*clip_t.shape, *([1] * (wf.dim() - clip_t.dim())))
    scale = amax.clamp(min=1e-30) / QMAX
    q = torch.round(wf / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, torch.where(amax > 0, scale, torch.zeros_like(scale))


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32 (``scale`` ``[.., out, 1]``)."""
    return q.float() * scale


# (device, K, N) -> whether torch._int_mm ran for that weight shape (decided on first use)
_INT_MM_OK: dict[tuple[str, int, int], bool] = {}


def _int_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor | None:
    """``torch._int_mm`` where this device and shape take it (cuBLASLt: more than 16 rows, which
    the padding gives, and K, N multiples of 8), else None."""
    m, k = xq.shape
    n = wq.shape[0]
    key = (str(xq.device), k, n)
    if k % 8 or n % 8 or _INT_MM_OK.get(key) is False:
        return None
    rows = max(m, 17)
    padded = torch.cat([xq, xq.new_zeros(rows - m, k)]) if rows != m else xq
    try:
        out = torch._int_mm(padded, wq.t())
    except (RuntimeError, NotImplementedError):  # a torch build or GPU without the int8 GEMM
        _INT_MM_OK[key] = False
        return None
    _INT_MM_OK[key] = True
    return out[:m].float()


def int8_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``xq [M, K] @ wq [N, K]^T`` of int8 matrices, as float32 ``[M, N]`` (the exact int32 sums on
    CUDA through ``torch._int_mm``; a float32 product of the integers elsewhere, see the module doc)."""
    if xq.is_cuda:
        out = _int_mm(xq, wq)
        if out is not None:
            return out
    return xq.float() @ wq.float().t()


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                pre_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ bias)`` with ``W ~= wq * w_scale`` and ``x`` quantized per token on the fly:
    ``(q_x q_w^T) * s_x s_w``. ``x`` ``[..., K]``; ``pre_scale`` ``[K]`` multiplies ``x`` first (a
    smoothing vector kept at run time). The result is float32."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if pre_scale is not None:
        x2 = x2 * pre_scale
    xq, xs = quantize_rows(x2)
    y = int8_mm(xq, wq) * xs[:, None] * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], wq.shape[0])


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` after per-token INT8 quantization and back (what an INT8 GEMM sees of it)."""
    q, s = quantize_rows(x)
    return q.float() * s[..., None]


@functools.lru_cache(maxsize=32)
def hadamard(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal ``n x n`` Sylvester Hadamard matrix (``n`` a power of two): symmetric and its
    own inverse, so ``W x = (W H)(H x)``. Cached: do not modify the result."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def rotation_block(k: int, limit: int = 128) -> int:
    """The largest power of two dividing ``k``, at most ``limit``: the block of a block-diagonal
    Hadamard rotation over ``k`` input channels."""
    return math.gcd(k, limit) if limit & (limit - 1) == 0 else 1


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [..., K]`` times the block-diagonal Hadamard of ``block``-sized blocks (an orthonormal,
    self-inverse map that spreads an outlier channel over its block)."""
    k = x.shape[-1]
    h = hadamard(block, x.device, x.dtype)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)
