"""Small building blocks shared by the DeepSeek-V2/V3 blocks: RMSNorm, Linear and its INT8 (W8A8)
form, the dense MLP, YaRN RoPE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.kernels import triton as triton_kernels
from matrixinfer.model.backend import CustomOp, cpu_float32
from matrixinfer.quant.int8 import rotate, w8a8_linear


class RMSNorm(CustomOp):
    """Root-mean-square norm computed in float32, as the reference implementation does (the
    ``cpu`` backend: one native call, ``small_ops.c``; ``cuda``: one Triton launch)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def supports(self, backend: str) -> bool:
        if backend == "cuda":
            return triton_kernels.usable(self.weight)
        return cpu_float32(self.weight) if backend == "cpu" else super().supports(backend)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x.contiguous(), self.weight, self.eps)

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        from matrixinfer.kernels.triton.norm import rmsnorm  # imports triton: only once chosen

        return rmsnorm(x, self.weight, self.eps)


class Linear(CustomOp, nn.Linear):
    """``nn.Linear`` whose ``cpu`` backend runs decode-sized batches (up to ``small_rows`` rows)
    through the native kernel: a BLAS call packs the weight on every call, which at a few rows
    costs more than the arithmetic (measured here: 10-25% of a decode step at 8-40 sequences)."""

    small_rows = 64

    def supports(self, backend: str) -> bool:
        if backend == "cpu":
            return self.bias is None and cpu_float32(self.weight)
        return super().supports(backend)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.small_rows:
            return kernels.linear(x.contiguous(), self.weight)
        return F.linear(x, self.weight, self.bias)


class Int8Linear(CustomOp):
    """A linear layer with INT8 weights and activations (W8A8, the layout of
    :mod:`matrixinfer.quant.format`): ``weight`` int8 ``[out, in]`` with per-output-channel
    ``weight_scale`` ``[out, 1]``; the input is quantized per token on every call. Optional:
    ``bias`` ``[out]`` (the quantizer's error compensation), ``pre_quant_scale`` ``[in]`` (a
    smoothing vector multiplied into the input) and ``rotate_block`` (the input is multiplied by a
    block Hadamard rotation; the stored weight was multiplied by the same).

    Every tensor is a buffer, so casting the model to its compute dtype leaves them as they are; the
    output has the input's dtype. ``native`` and ``cuda`` compute through
    :func:`matrixinfer.quant.int8.w8a8_linear` (``torch._int_mm`` on CUDA); the ``cpu`` backend runs
    decode-sized batches (up to ``small_rows`` rows) through the native INT8 kernel."""

    small_rows = Linear.small_rows

    def __init__(self, in_features: int, out_features: int, bias: bool = False, pre_quant_scale: bool = False,
                 rotate_block: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.bias: torch.Tensor | None
        self.pre_quant_scale: torch.Tensor | None
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("pre_quant_scale", torch.ones(in_features) if pre_quant_scale else None)
        if rotate_block and (rotate_block & (rotate_block - 1) or in_features % rotate_block):
            raise ValueError(f"rotation block {rotate_block} must be a power of two dividing {in_features}")
        self.rotate_block = rotate_block

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rotate_block={self.rotate_block}")

    def supports(self, backend: str) -> bool:
        if backend == "cpu":
            return self.weight.is_cpu and kernels.available()
        if backend == "cuda":
            return self.weight.is_cuda
        return super().supports(backend)

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input as the GEMM's quantizer sees it, and the smoothing vector still to apply."""
        if not self.rotate_block:
            return x, self.pre_quant_scale
        xf = x.float() if self.pre_quant_scale is None else x.float() * self.pre_quant_scale
        return rotate(xf, self.rotate_block), None

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        xin, pre = self._input(x)
        return w8a8_linear(xin, self.weight, self.weight_scale, self.bias, pre).to(x.dtype)

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_native(x)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] > self.small_rows or x.dtype is not torch.float32:
            return self.forward_native(x)
        if self.rotate_block:
            x = self._input(x)[0]
        return self._kernel()(x)

    def _kernel(self) -> kernels.LinearW8A8:
        """The native call with this module's operands checked once (rebuilt if one was replaced):
        a decode step's small matrices cost little more than the call itself, so the per-call
        checks are kept to the input's."""
        b, k = self._buffers, self.__dict__.get("_w8a8")
        pre = None if self.rotate_block else b["pre_quant_scale"]
        if k is None or k.weight is not b["weight"] or k.weight_scale is not b["weight_scale"] \
                or k.bias is not b["bias"] or k.pre_scale is not pre:
            k = kernels.LinearW8A8(self.weight, self.weight_scale, self.bias, pre)
            self.__dict__["_w8a8"] = k
        return k


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction ``0.1 * mscale * ln(scale) + 1`` (1 when unscaled)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    rs = cfg.rope_scaling or {}
    base = cfg.rope_theta
    original = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    factor = rs.get("factor") or cfg.max_position_embeddings / original
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation = 1.0 - ramp  # 1 for high-frequency dims that keep their original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """Attention logit scale: ``1/sqrt(qk_head_dim)``, times mscale_all_dim's correction squared."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
        m = yarn_mscale(factor, rs["mscale_all_dim"])
        scale *= m * m
    return scale


def rope_interleaved(cfg: ModelConfig) -> bool:
    """Whether rotary pairs are interleaved ``(x0, x1), (x2, x3), ...`` (the DeepSeek layout) rather
    than rotate-half: V3 checkpoints may set ``rope_interleave=false``; V2 is always interleaved."""
    return bool(cfg.raw.get("rope_interleave", True)) if cfg.is_v3 else True


class RotaryEmbedding(nn.Module):
    """Decoupled RoPE over the ``qk_rope_head_dim`` dims, with YaRN scaling when configured.

    Rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` (the DeepSeek checkpoint layout) and
    returns them de-interleaved (evens' rotation then odds'); queries and keys get the same
    permutation, so attention scores are unchanged.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.qk_rope_head_dim
        # the tables are computed on the CPU whatever the default device: on the meta device (a model
        # being built for loading) they would run torch's Python reference ops and import torch._dynamo
        if cfg.rope_scaling:
            inv_freq, self.attention_factor = _yarn_inv_freq(cfg, dim)
        else:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
            self.attention_factor = 1.0
        self.interleaved = rope_interleaved(cfg)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin by position, grown on demand

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-width cos/sin tables ``[T, dim/2]`` for integer ``positions`` ``[T]``.

        Small CPU batches (decode steps) look rows up in a table of the positions seen so far (the
        same arithmetic, computed once); other batches, and CUDA (no host sync), compute them."""
        if positions.is_cpu and 0 < positions.numel() <= 256:
            top = int(positions.max())
            if self._table is None or top >= self._table[0].shape[0]:
                self._table = self._compute(torch.arange(max(top + 1, 2048)))
            cos, sin = self._table
            return cos[positions], sin[positions]
        return self._compute(positions)

    def _compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``[T, ..., dim]`` with tables from :meth:`cos_sin` (``[T, dim/2]``)."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        c, s = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
