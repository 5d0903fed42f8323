"""Write the trained model as a standard Hugging Face DeepSeek-V3 checkpoint.

Tensors use the upstream names (routed experts unstacked, the MTP module as
``model.layers.{num_hidden_layers}.*`` with its own copies of the shared embedding and head, as in
DeepSeek-V3's release); matrices are stored in bfloat16, routers in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from matrixinfer.model.deepseek import DeepseekForCausalLM, MTPLayer
from matrixinfer.model.export import export_state_dict


def checkpoint_tensors(model: DeepseekForCausalLM, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """All checkpoint tensors, including MTP weights tied to the main embedding and head."""
    tensors = export_state_dict(model, dtype)
    n = model.config.num_hidden_layers
    for k, m in enumerate(model.mtp):  # named_parameters() drops tied weights: write them explicitly
        assert isinstance(m, MTPLayer)  # a ModuleList's items are typed as Module
        for name, weight in (("embed_tokens.weight", m.embed_tokens.weight),
                             ("shared_head.head.weight", m.shared_head.head.weight)):
            tensors.setdefault(f"model.layers.{n + k}.{name}", weight.detach().to(dtype).contiguous().clone())
    return tensors


def save_checkpoint(model: DeepseekForCausalLM, config: dict[str, Any], out_dir: Path,
                    dtype: torch.dtype = torch.bfloat16) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in checkpoint_tensors(model, dtype).items()}
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "do_sample": False, "max_new_tokens": 128}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
