"""Write a quantized model as an INT8 checkpoint (the layout of :mod:`matrixinfer.quant.format`).

Floating-point tensors the quantizer left as they were keep the source checkpoint's dtype (bf16
stays bf16; FP8 sources are written in bf16); tensors it changed (norm weights and routers that
absorbed smoothing vectors, ``kv_b_proj``'s value rows, any high-precision weight a smoothing
vector was folded into) are written in float32, so serving adds no rounding the calibration did
not see. Files other than weights and ``config.json`` (tokenizer, generation config, notices) are
copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.experts import Int8Experts
from matrixinfer.model.export import export_state_dict
from matrixinfer.model.fp8 import FP8_DTYPE
from matrixinfer.model.layers import Int8Linear, Linear
from matrixinfer.model.loader import read_checkpoint_tensors
from matrixinfer.quant.format import quantization_config

# Stacked INT8 expert buffers -> (checkpoint projections, tensor suffix); the loader's inverse.
_STACKS = {
    "gate_up_proj": (("gate_proj", "up_proj"), "weight"),
    "gate_up_proj_scale": (("gate_proj", "up_proj"), "weight_scale"),
    "gate_up_proj_bias": (("gate_proj", "up_proj"), "bias"),
    "gate_up_proj_pre_quant_scale": (("gate_proj", "up_proj"), "pre_quant_scale"),
    "down_proj": (("down_proj",), "weight"),
    "down_proj_scale": (("down_proj",), "weight_scale"),
    "down_proj_bias": (("down_proj",), "bias"),
    "down_proj_pre_quant_scale": (("down_proj",), "pre_quant_scale"),
}


def checkpoint_name(ours: str, n_layers: int) -> str:
    """The Hugging Face name of our module path ``ours`` (MTP depth k is ``model.layers.{n + k}``)."""
    if not ours.startswith("mtp."):
        return ours
    _, k, rest = ours.split(".", 2)
    rest = rest[len("block."):] if rest.startswith("block.") else rest
    return f"model.layers.{n_layers + int(k)}.{rest}"


def int8_tensors(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """The INT8 modules' tensors under their checkpoint names (experts unstacked)."""
    n_layers = model.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            base = checkpoint_name(name, n_layers)
            for b, t in mod.named_buffers(recurse=False):
                out[f"{base}.{b}"] = t
        elif isinstance(mod, Int8Experts):
            base = checkpoint_name(name, n_layers)
            for b, t in mod.named_buffers(recurse=False):
                parts, suffix = _STACKS[b]
                for e in range(mod.n_experts):
                    for i, part in enumerate(parts):
                        if len(parts) == 1 or suffix == "pre_quant_scale":
                            piece = t[e]
                        else:
                            half = t.shape[1] // 2
                            piece = t[e, i * half:(i + 1) * half]
                        out[f"{base}.{e}.{part}.{suffix}"] = piece
    return out


def checkpoint_tensors(model: DeepseekForCausalLM, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the INT8 checkpoint of ``model``; ``source`` is the original checkpoint's
    tensors (their dtypes, and whether a float tensor changed)."""
    tensors = export_state_dict(model)
    for name, t in list(tensors.items()):
        orig = source.get(name)
        if orig is not None and orig.dtype is FP8_DTYPE:
            tensors[name] = t.to(torch.bfloat16)
        elif orig is not None and orig.shape == t.shape and torch.equal(orig.to(t.dtype), t):
            tensors[name] = orig
        else:
            tensors[name] = t.float()
    tensors.update(int8_tensors(model))
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def write_checkpoint(model: DeepseekForCausalLM, source_dir: str | Path, out_dir: str | Path,
                     rotated: dict[str, int] | None = None, details: dict[str, Any] | None = None) -> Path:
    """Write the INT8 checkpoint of ``model`` (quantized from ``source_dir``) to ``out_dir``:
    ``model.safetensors``, ``config.json`` with its ``quantization_config`` (``ignore``: every
    linear left in floating point), and the source's other files. ``rotated`` uses our module
    names (stored under checkpoint names); ``details`` is the quantizer's record."""
    src, out = Path(source_dir), Path(out_dir)
    if src.resolve() == out.resolve():
        raise ValueError(f"{out}: the INT8 checkpoint must not overwrite its source")
    if not any(isinstance(m, (Int8Linear, Int8Experts)) for m in model.modules()):
        raise ValueError("the model has no INT8 module: every candidate stayed in high precision")
    n_layers = model.config.num_hidden_layers
    ignore = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    tensors = checkpoint_tensors(model, read_checkpoint_tensors(src))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model") \
                and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(
        [checkpoint_name(n, n_layers) for n in ignore],
        {checkpoint_name(n, n_layers): b for n, b in (rotated or {}).items()}, details)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
