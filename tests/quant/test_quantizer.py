"""The offline pass on tiny checkpoints: smoothing is exact, each step's switch is honoured, the
written INT8 checkpoint loads into INT8 modules with their backends and computes what the
quantized model computed, and stays close to the float model."""

import json

import pytest
import torch
from safetensors import safe_open

from matrixinfer.model.backend import select_backend
from matrixinfer.model.experts import Int8Experts
from matrixinfer.model.layers import Int8Linear, Linear
from matrixinfer.model.loader import load_model
from matrixinfer.quant import quantizer as Q
from matrixinfer.quant.checkpoint import write_checkpoint
from matrixinfer.quant.format import QUANT_METHOD
from matrixinfer.quant.policy import QuantRecipe
from tests.quant.conftest import logits, windows

OFF = QuantRecipe(mixed_precision=False, smooth=False, rotate=False, clip=False, bias_correction=False)


def test_smoothing_is_absorbed_exactly(tiny_v3):
    """Dividing each input where it is produced and multiplying its consumers changes no output."""
    model = load_model(tiny_v3, progress=False)
    select_backend(model, "native")
    w = windows(1)
    batch = Q._Batch(model.rope, w.shape[0], w.shape[1] - 1)
    x = model.model.embed_tokens(w[:, :-1].reshape(-1))
    changed = 0
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            units = {n[len(prefix):] for n in Q.candidates(model) if n.startswith(prefix)}
            norm = block.post_attention_layernorm.weight.clone()
            y0 = batch.run(block, x)
            chosen = Q._smooth(block, Q._capture(block, batch, x), units, QuantRecipe())
            y1 = batch.run(block, x)
            assert (y1 - y0).norm() / (y0 - x).norm() < 1e-5, chosen
            changed += int(not torch.equal(norm, block.post_attention_layernorm.weight))
            x = y1
    assert changed  # the search did smooth something (else this test shows nothing)


def test_int8_checkpoint_layout(quantized):
    model, report, out = quantized
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == QUANT_METHOD and cfg["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    assert "lm_head" in cfg["ignore"] and "model.layers.0.self_attn.kv_b_proj" in cfg["ignore"]
    assert cfg["rotated_inputs"] == {"model.layers.0.mlp.down_proj": 32,
                                     "model.layers.1.mlp.shared_experts.down_proj": 32,
                                     "model.layers.2.mlp.shared_experts.down_proj": 32}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_a_proj.weight").dtype is torch.int8
        assert f.get_tensor("model.layers.0.self_attn.q_a_proj.weight_scale").shape == (24, 1)
        assert f.get_tensor("model.layers.1.mlp.experts.7.down_proj.weight").dtype is torch.int8
        assert f.get_tensor("lm_head.weight").is_floating_point()
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale" in names
    assert not any(n.startswith("model.layers.0.self_attn.kv_b_proj.weight_") for n in names)


def test_int8_checkpoint_loads_into_int8_modules_and_computes_what_was_calibrated(quantized):
    model, _, out = quantized
    loaded = load_model(out, progress=False)
    kinds = select_backend(loaded, "cpu")
    assert kinds.get("Experts:int8-cpu-native") == 2 and kinds.get("Int8Linear:cpu", 0) >= 14
    assert isinstance(loaded.model.layers[1].mlp.experts, Int8Experts)
    assert isinstance(loaded.lm_head, Linear) and not isinstance(loaded.lm_head, Int8Linear)
    assert loaded.model.layers[0].mlp.down_proj.rotate_block == 32
    w = windows(2, n=2, length=20)  # 40 rows: the native kernels' decode-sized path
    native = logits(model, w)
    assert torch.allclose(logits(loaded, w), native, atol=1e-3, rtol=1e-3)
    select_backend(loaded, "native")
    assert torch.allclose(logits(loaded, w), native, atol=1e-5, rtol=1e-5)


# Random tiny models are harsher than trained ones: V3's group-limited top-2 of 8 random experts
# flips on small perturbations (measured: 9% logit error, 95% top-1 agreement; 3% and 97% for V2).
@pytest.mark.parametrize("arch,max_error,min_agreement", [("v3", 0.2, 0.85), ("v2", 0.06, 0.93)])
def test_int8_stays_close_to_the_float_model(arch, max_error, min_agreement, tiny_v3, tiny_v2):
    ckpt = tiny_v3 if arch == "v3" else tiny_v2
    model = load_model(ckpt, progress=False)
    w = windows(3)
    ref = logits(model, w)
    Q.Quantizer(model, windows(4), progress=False).run()
    got = logits(model, w)
    assert (got - ref).norm() / ref.norm() < max_error
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > min_agreement


def test_each_step_can_be_switched_off(tiny_v3):
    model = load_model(tiny_v3, progress=False)
    norms = {n: p.clone() for n, p in model.named_parameters() if n.endswith("norm.weight")}
    report = Q.Quantizer(model, windows(5), OFF, progress=False).run()
    assert all(torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)  # no smoothing
    assert report.high_precision == {} and report.sensitivity == {} and report.rotated == {}
    assert isinstance(model.lm_head, Int8Linear)  # no mixed precision: the head too
    assert all(b.clip == 1.0 and not b.bias_correction for b in report.blocks)
    int8 = [m for m in model.modules() if isinstance(m, (Int8Linear, Int8Experts))]
    assert int8 and all(getattr(m, "bias", None) is None and getattr(m, "down_proj_bias", None) is None for m in int8)


def test_mixed_precision_keeps_heads_and_flagged_modules(tiny_v3):
    model = load_model(tiny_v3, progress=False)
    report = Q.Quantizer(model, windows(6), QuantRecipe(sensitivity_threshold=-1.0), progress=False).run()
    assert report.high_precision["lm_head"] == "policy"
    assert set(report.sensitivity) == set(report.int8) | set(report.high_precision)
    assert report.int8 == [] and not any(isinstance(m, Int8Linear) for m in model.modules())
    assert "high (sensitive)" in report.table()
    with pytest.raises(ValueError, match="no INT8 module"):
        write_checkpoint(model, tiny_v3, tiny_v3.parent / "nothing")
