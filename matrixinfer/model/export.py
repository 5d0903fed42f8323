"""Write our model back in the Hugging Face checkpoint layout (the inverse of the loader's mapping):
routed experts unstacked to ``mlp.experts.E.{gate,up,down}_proj.weight`` and MTP modules stored as
``model.layers.{num_hidden_layers + k}.*``."""

from __future__ import annotations

import torch

from matrixinfer.model.deepseek import DeepseekForCausalLM


def export_state_dict(model: DeepseekForCausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (contiguous, optionally cast) keyed by Hugging Face names."""
    n_layers = model.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    for name, param in tensors.items():
        t = param.detach()
        if name.startswith("mtp."):
            _, k, rest = name.split(".", 2)
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            name = f"model.layers.{n_layers + int(k)}.{rest}"
        if name.endswith("experts.gate_up_proj"):
            base, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{base}{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    keep_fp32 = ("mlp.gate.weight", "e_score_correction_bias")
    return {k: (v if dtype is None or k.endswith(keep_fp32) else v.to(dtype)).contiguous().clone()
            for k, v in out.items()}
