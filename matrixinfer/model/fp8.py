"""FP8 (e4m3) weights with 2-D block scales, as stored by DeepSeek-V3/R1 checkpoints.

A weight ``W [out, in]`` is stored as ``Q = fp8(W / s)`` with one scale per 128x128 block kept in
``weight_scale_inv`` (the multiplier that restores the weight: ``W ~= Q * s``).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def _expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    bo, bi = block
    return scale.repeat_interleave(bo, 0)[: shape[0]].repeat_interleave(bi, 1)[:, : shape[1]]


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                          dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """Restore ``weight`` (fp8) with its per-block ``scale_inv`` to ``dtype``."""
    expect = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expect} "
                         f"for a {tuple(weight.shape)} weight with {block[0]}x{block[1]} blocks")
    return (weight.float() * _expand(scale_inv.float(), weight.shape, block)).to(dtype)


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to fp8 with per-block scales; returns ``(q, scale_inv)``."""
    out_dim, in_dim = weight.shape
    bo, bi = block
    nb_o, nb_i = -(-out_dim // bo), -(-in_dim // bi)
    padded = torch.zeros(nb_o * bo, nb_i * bi, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(nb_o, bo, nb_i, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).view(nb_o * bo, nb_i * bi)[:out_dim, :in_dim]
    return q.to(FP8_DTYPE), scale_inv
