"""Checkpoint loading: sharded files, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from matrixinfer.config import ConfigError
from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.loader import CheckpointError, load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_identically(tiny_v3, tmp_path):
    ck = _copy(tiny_v3, tmp_path / "sharded")
    tensors = load_file(ck / "model.safetensors")
    (ck / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, ck / fname)
        weight_map.update({n: fname for n in part})
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(tiny_v3, progress=False), load_model(ck, progress=False)
    ids, meta = torch.tensor([3, 4, 5, 6]), AttentionMetadata.build([4])
    with torch.no_grad():
        assert torch.equal(a(ids, torch.arange(4), meta), b(ids, torch.arange(4), meta))


def test_missing_tensor_is_named(tiny_v3, tmp_path):
    ck = _copy(tiny_v3, tmp_path / "missing")
    tensors = load_file(ck / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, ck / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"missing .*model\.layers\.1\.self_attn\.kv_b_proj\.weight.*expected shape"):
        load_model(ck, progress=False)


def test_wrong_shape_is_named(tiny_v3, tmp_path):
    ck = _copy(tiny_v3, tmp_path / "shape")
    tensors = load_file(ck / "model.safetensors")
    tensors["model.layers.2.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 7)
    save_file(tensors, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.2\.mlp\.experts\.3\."
                                              r"up_proj\.weight has shape \[5, 7\], expected \[32, 64\]"):
        load_model(ck, progress=False)


def test_truncated_file_is_named(tiny_v3, tmp_path):
    ck = _copy(tiny_v3, tmp_path / "trunc")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(ck, progress=False)


def test_unsupported_architecture(tiny_v3, tmp_path):
    ck = _copy(tiny_v3, tmp_path / "arch")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture 'LlamaForCausalLM'"):
        load_model(ck, progress=False)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nope", progress=False)
