"""The quantizer's decisions as pure functions and constants: which modules may be INT8 and which
stay in high precision (step 1), the smoothing-scale formula and its search grid (step 2), the
clipping grid (step 5), and the recipe that switches each step on or off. No I/O, no model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for its recipe flags: every command's process would load torch
    import torch

#: SmoothQuant migration strengths tried per smoothing group; ``None`` is "no smoothing" (s = 1),
#: so the search never picks something worse than not smoothing on the calibration data
ALPHA_GRID: tuple[float | None, ...] = (None, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: clipping ratios tried per block (1.0: the largest weight of a channel maps to 127)
CLIP_GRID: tuple[float, ...] = (1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.75, 0.7)

#: block-relative linears whose input step 3's rotation option rotates (online, block Hadamard): the
#: down projections read the SwiGLU product, whose outlier channels smoothing cannot tame from a norm
ROTATED_INPUTS: tuple[str, ...] = ("mlp.down_proj", "mlp.shared_experts.down_proj")

# Linear modules the runtime could run in INT8 but the mixed-precision policy keeps in high
# precision: the vocabulary heads (their errors go straight into the logits) and MTP's input
# projection (it mixes two normalised streams of different scale).
_HEADS = re.compile(r"(^lm_head|\.shared_head\.head|\.eh_proj)$")
# Never INT8: kv_b_proj is read as a matrix by absorbed attention (the runtime refuses it).
_NEVER = re.compile(r"\.kv_b_proj$")


@dataclass(frozen=True)
class QuantRecipe:
    """Which of the five accuracy-preserving steps run (each can be switched off for ablation).

    Attributes:
        mixed_precision: step 1: keep the vocabulary heads, MTP's eh_proj and every module the
            sensitivity analysis flags in high precision (norms, routers, embeddings and kv_b_proj
            always are).
        smooth: step 2: per-layer SmoothQuant scale search (migration strength chosen per
            smoothing group to minimise the group's output error on calibration data).
        rotate: step 3's rotation option: a block Hadamard rotation of the inputs of the dense
            and shared-expert down projections (the scale absorption of step 3 always runs).
        clip: step 5: per-block search of the weight clipping ratio that minimises the block's
            output error.
        bias_correction: step 5: per-channel error-compensation bias from calibration data
            (kept only for blocks where, fitted on half the windows, it lowers the output error
            on the other half).
        sensitivity_threshold: step 1: relative increase of calibration NLL, when a module alone
            is INT8, above which the module stays in high precision.
        min_expert_tokens: calibration tokens a routed expert needs before it gets a compensation bias.
    """

    mixed_precision: bool = True
    smooth: bool = True
    rotate: bool = False
    clip: bool = True
    bias_correction: bool = True
    sensitivity_threshold: float = 0.002
    min_expert_tokens: int = 16

    def steps(self) -> dict[str, bool]:
        return {"mixed_precision": self.mixed_precision, "smooth": self.smooth, "rotate": self.rotate,
                "clip": self.clip, "bias_correction": self.bias_correction}


def may_be_int8(name: str) -> bool:
    """Whether the linear module ``name`` (our module names) can run in INT8 at all."""
    return _NEVER.search(name) is None


def high_precision_by_default(name: str) -> bool:
    """Whether the mixed-precision policy keeps ``name`` in high precision before any measurement."""
    return _HEADS.search(name) is not None


def flag_sensitive(deltas: dict[str, float], threshold: float) -> set[str]:
    """Modules whose solo INT8 error (relative NLL increase) exceeds ``threshold``."""
    return {name for name, d in deltas.items() if d > threshold}


def smoothing_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s = max|X|^alpha / max|W|^(1 - alpha)`` (the input is divided
    by ``s`` and the weight multiplied), normalised to a geometric mean of 1 (a common factor changes
    nothing under per-token and per-channel scales); ones for ``alpha`` None."""
    if alpha is None:
        return act_amax.float().new_ones(act_amax.shape)
    a = act_amax.float().clamp(min=1e-5)
    w = weight_amax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return s / s.log().mean().exp()
