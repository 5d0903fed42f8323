"""The INT8 checkpoint layout (what ``matrixinfer quantize`` writes and the loader reads).

A Hugging Face DeepSeek checkpoint whose quantized linears carry, under their usual names:

- ``<module>.weight``: int8 ``[out, in]``, symmetric, per output channel;
- ``<module>.weight_scale``: float32 ``[out, 1]`` with ``W ~= weight * weight_scale``;
- ``<module>.bias``: float32 ``[out]``, optional (the error-compensation term, plus any original bias);
- ``<module>.pre_quant_scale``: float32 ``[in]``, optional: a smoothing vector multiplied into the
  input at run time where it could not be folded into the preceding operator.

Routed experts keep the unstacked names (``mlp.experts.E.{gate,up,down}_proj.*``). Activations are
quantized dynamically per token, so there is no stored input scale. Everything else (embeddings,
norms, routers, ``kv_b_proj``, the heads, whatever the sensitivity analysis kept) stays floating
point. ``config.json`` gets a ``quantization_config`` in the shape of compressed-tensors' W8A8
configs (``config_groups`` with ``weights``/``input_activations``, ``ignore``) under its own
``quant_method``, because the optional tensors above are not part of compressed-tensors' format;
``rotated_inputs`` names the modules whose input is multiplied by a block Hadamard rotation first.

The tensors are self-describing: a module is INT8 exactly when ``<module>.weight_scale`` exists.
FP8 checkpoints use ``weight_scale_inv``, so the two never collide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

QUANT_METHOD = "matrixinfer-w8a8"
FORMAT_VERSION = 1
SCALE_SUFFIX = ".weight_scale"
#: per-module tensor suffixes of the layout, besides ``weight``
OPTIONAL_SUFFIXES = ("bias", "pre_quant_scale")


class QuantFormatError(ValueError):
    """A ``quantization_config`` or INT8 tensor set this runtime cannot serve (the message says why)."""


def quantization_config(ignore: Iterable[str], rotated: dict[str, int] | None = None,
                        details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block of an INT8 checkpoint: ``ignore`` lists the linear modules
    left in floating point, ``rotated`` maps module names to their Hadamard block, ``details``
    records how the quantizer ran (steps, per-layer choices) for people, not for the loader."""
    return {
        "quant_method": QUANT_METHOD,
        "format": "int-quantized",
        "version": FORMAT_VERSION,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True},
            }
        },
        "ignore": sorted(ignore),
        "rotated_inputs": dict(sorted((rotated or {}).items())),
        "kv_cache_scheme": None,
        "matrixinfer": details or {},
    }


@dataclass(frozen=True)
class Int8Layout:
    """Which checkpoint modules are INT8 (``modules``: names without the ``.weight`` suffix, experts
    individually) and which take a rotated input (``rotated``: module -> Hadamard block)."""

    modules: frozenset[str]
    rotated: dict[str, int] = field(default_factory=dict)


def parse_layout(config: dict[str, Any] | None, tensor_names: Iterable[str]) -> Int8Layout | None:
    """The INT8 layout of a checkpoint from its ``quantization_config`` and tensor names, or None
    for a checkpoint without INT8 modules. Raises :class:`QuantFormatError` for a method or version
    this runtime does not know, or a config that promises INT8 tensors that are not there."""
    modules = frozenset(n[: -len(SCALE_SUFFIX)] for n in tensor_names if n.endswith(SCALE_SUFFIX))
    method = (config or {}).get("quant_method")
    if not modules:
        if method == QUANT_METHOD:
            raise QuantFormatError(f"quantization_config says {QUANT_METHOD} but no tensor ends in {SCALE_SUFFIX}")
        return None
    if method != QUANT_METHOD:
        raise QuantFormatError(f"tensors such as {min(modules)}{SCALE_SUFFIX} need quantization_config.quant_method "
                               f"{QUANT_METHOD!r}, found {method!r}")
    assert config is not None
    version = config.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise QuantFormatError(f"quantization_config.version {version} is not supported (this runtime reads "
                               f"{FORMAT_VERSION})")
    rotated = config.get("rotated_inputs") or {}
    if not isinstance(rotated, dict) or not all(isinstance(v, int) and v > 0 and v & (v - 1) == 0
                                                 for v in rotated.values()):
        raise QuantFormatError(f"quantization_config.rotated_inputs must map module names to power-of-two "
                               f"block sizes, got {rotated!r}")
    unknown = sorted(set(rotated) - modules)
    if unknown:
        raise QuantFormatError(f"quantization_config.rotated_inputs names modules that are not INT8: {unknown[:3]}")
    return Int8Layout(modules, dict(rotated))
