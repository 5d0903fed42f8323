"""The INT8 checkpoint layout: what the loader accepts, and the named errors for what it cannot serve."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from matrixinfer.model.loader import CheckpointError, load_model
from matrixinfer.quant.format import QUANT_METHOD, QuantFormatError, parse_layout, quantization_config
from tests.quant.conftest import logits, windows


def test_layout_is_read_from_the_tensor_names():
    names = ["a.weight", "a.weight_scale", "b.weight", "m.experts.0.up_proj.weight_scale"]
    layout = parse_layout(quantization_config(["b"], {"a": 64}), names)
    assert layout is not None and layout.modules == {"a", "m.experts.0.up_proj"} and layout.rotated == {"a": 64}
    assert parse_layout(None, ["a.weight"]) is None
    assert parse_layout({"quant_method": "fp8", "weight_block_size": [128, 128]}, ["a.weight_scale_inv"]) is None


@pytest.mark.parametrize("config,names,match", [
    ({"quant_method": QUANT_METHOD}, ["a.weight"], "no tensor ends in .weight_scale"),
    (None, ["a.weight_scale"], "need quantization_config.quant_method"),
    ({"quant_method": "compressed-tensors"}, ["a.weight_scale"], "found 'compressed-tensors'"),
    ({"quant_method": QUANT_METHOD, "version": 9}, ["a.weight_scale"], "version 9"),
    ({"quant_method": QUANT_METHOD, "rotated_inputs": {"a": 48}}, ["a.weight_scale"], "power-of-two"),
    ({"quant_method": QUANT_METHOD, "rotated_inputs": {"b": 64}}, ["a.weight_scale"], "not INT8"),
])
def test_layout_errors_say_what_is_wrong(config, names, match):
    with pytest.raises(QuantFormatError, match=match):
        parse_layout(config, names)


@pytest.fixture
def int8_checkpoint(quantized):
    return quantized[2]


def _edited(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_int8_weight_without_its_scale_is_refused(int8_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.o_proj"

    def drop_scale(t):
        del t[f"{name}.weight_scale"]

    bad = _edited(int8_checkpoint, tmp_path / "c", drop_scale)
    with pytest.raises(CheckpointError, match=f"{name}.weight is int8 but has no {name}.weight_scale"):
        load_model(bad, progress=False)


def test_float_weight_where_int8_is_expected_is_refused(int8_checkpoint, tmp_path):
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    bad = _edited(int8_checkpoint, tmp_path / "c", lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(CheckpointError, match=f"{name} is torch.float32; this INT8 module expects int8"):
        load_model(bad, progress=False)


def test_kv_b_proj_in_int8_is_refused(int8_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.kv_b_proj"

    def quantize_kv_b(t):
        w = t[f"{name}.weight"].float()
        t[f"{name}.weight_scale"] = w.abs().amax(1, keepdim=True) / 127
        t[f"{name}.weight"] = (w / t[f"{name}.weight_scale"]).round().to(torch.int8)

    bad = _edited(int8_checkpoint, tmp_path / "c", quantize_kv_b)
    with pytest.raises(CheckpointError, match="kv_b_proj is stored in INT8"):
        load_model(bad, progress=False)


def test_partially_int8_experts_are_refused(int8_checkpoint, tmp_path):
    name = "model.layers.1.mlp.experts.5.down_proj"

    def dequantize_one(t):
        t[f"{name}.weight"] = t[f"{name}.weight"].float() * t.pop(f"{name}.weight_scale")

    bad = _edited(int8_checkpoint, tmp_path / "c", dequantize_one)
    with pytest.raises(CheckpointError, match="every routed expert's gate_proj, up_proj and down_proj must be INT8"):
        load_model(bad, progress=False)


def test_unknown_quant_method_is_refused(int8_checkpoint, tmp_path):
    bad = _edited(int8_checkpoint, tmp_path / "c",
                  edit_config=lambda c: c["quantization_config"].__setitem__("quant_method", "other"))
    with pytest.raises(CheckpointError, match=f"{bad}: .*quant_method 'matrixinfer-w8a8', found 'other'"):
        load_model(bad, progress=False)


def test_optional_tensors_decide_the_module_options(int8_checkpoint, tmp_path):
    """A runtime smoothing vector (pre_quant_scale) is applied: doubling the input and halving the
    weight scales computes the same (per-token quantization of 2x is that of x, scale doubled)."""
    name = "model.layers.0.mlp.gate_proj"

    def add_pre_scale(t):
        t[f"{name}.pre_quant_scale"] = torch.full((t[f"{name}.weight"].shape[1],), 2.0)
        t[f"{name}.weight_scale"] = t[f"{name}.weight_scale"] / 2

    model = load_model(_edited(int8_checkpoint, tmp_path / "c", add_pre_scale), progress=False)
    assert model.model.layers[0].mlp.gate_proj.pre_quant_scale is not None
    assert model.model.layers[0].mlp.up_proj.pre_quant_scale is None
    w = windows(7, n=2, length=12)
    assert torch.allclose(logits(model, w), logits(load_model(int8_checkpoint, progress=False), w), atol=1e-5)
