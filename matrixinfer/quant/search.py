"""The quantizer's searches, as functions of tensors (no model, no I/O): the smoothing strength of
one smoothing group (step 2) and the clipping ratio of one block (step 5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from matrixinfer.quant.int8 import fake_quant_rows, quantize_weight, rotate
from matrixinfer.quant.policy import ALPHA_GRID, CLIP_GRID, smoothing_scales


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref||^2 / ||ref||^2``."""
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30))


def w8a8_output(x: torch.Tensor, w: torch.Tensor, clip: float = 1.0, rotate_block: int = 0) -> torch.Tensor:
    """What an INT8 linear computes for ``x`` with float weight ``w`` quantized per channel at ``clip``
    (simulated in float32: quantize and dequantize both operands)."""
    if rotate_block:
        x, w = rotate(x.float(), rotate_block), rotate(w.float(), rotate_block)
    q, s = quantize_weight(w, clip)
    return fake_quant_rows(x) @ (q.float() * s).t()


def group_error(consumers: Sequence[tuple[torch.Tensor, torch.Tensor]], s: torch.Tensor,
                rotate_block: int = 0) -> float:
    """Summed relative output error of the INT8 ``consumers`` (weight ``[out, in]``, inputs ``[n, in]``)
    of one input after smoothing by ``s`` (inputs divided, weights multiplied)."""
    err = 0.0
    for w, x in consumers:
        ref = x.float() @ w.float().t()
        err += relative_error(w8a8_output(x.float() / s, w.float() * s, rotate_block=rotate_block), ref)
    return err


def search_smoothing(act_amax: torch.Tensor, consumers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     alphas: Sequence[float | None] = ALPHA_GRID,
                     rotate_block: int = 0) -> tuple[float | None, torch.Tensor, dict[str, float]]:
    """The migration strength (``None``: no smoothing) of :data:`~matrixinfer.quant.policy.ALPHA_GRID`
    whose smoothing scales give the smallest :func:`group_error`; returns it, its scales ``[in]``
    and every candidate's error (keyed ``"none"`` or the strength)."""
    w_amax = torch.stack([w.float().abs().amax(dim=0) for w, _ in consumers]).amax(dim=0)
    errors: dict[str, float] = {}
    best: tuple[float, float | None, torch.Tensor] | None = None
    for alpha in alphas:
        s = smoothing_scales(act_amax, w_amax, alpha)
        err = group_error(consumers, s, rotate_block)
        errors["none" if alpha is None else f"{alpha:g}"] = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None, "an empty grid"
    return best[1], best[2], errors


def search_clip(block_error: Callable[[float], float],
                grid: Sequence[float] = CLIP_GRID) -> tuple[float, dict[str, float]]:
    """The clipping ratio of ``grid`` with the smallest ``block_error(ratio)``, and every error."""
    errors = {f"{r:g}": block_error(r) for r in grid}
    best = min(grid, key=lambda r: errors[f"{r:g}"])
    return best, errors
