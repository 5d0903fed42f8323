"""FP8 block-scaled checkpoints load back within FP8's error of the original weights."""

from __future__ import annotations

import json

from safetensors.torch import load_file, save_file

from matrixinfer.model.fp8 import FP8_DTYPE, quantize_fp8_blocks
from matrixinfer.model.loader import load_model
from tests.checkpoints import make_checkpoint

BLOCK = (16, 16)  # the tiny model's matrices are smaller than DeepSeek's 128x128 blocks


def test_fp8_checkpoint_loads_within_fp8_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "bf", "v3", seed=5)
    original = load_file(ckpt / "model.safetensors")
    quantized = {}
    n_fp8 = 0
    for name, t in original.items():
        if t.dim() == 2 and name.endswith("proj.weight") and "gate.weight" not in name:
            q, s = quantize_fp8_blocks(t, BLOCK)
            quantized[name] = q
            quantized[name[: -len("weight")] + "weight_scale_inv"] = s
            n_fp8 += 1
        else:
            quantized[name] = t
    assert n_fp8 > 20
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(quantized, out / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK)}
    (out / "config.json").write_text(json.dumps(cfg))
    model = load_model(out, progress=False)
    exact = load_model(ckpt, progress=False)
    got, ref = dict(model.named_parameters()), dict(exact.named_parameters())
    for name, p in ref.items():
        err = (got[name] - p).abs()
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each value, plus the block's
        # subnormal floor (amax/448 * 2^-9) for values near zero.
        bound = p.abs() * 2 ** -4 + 1e-3
        assert bool((err <= bound).all()), name
    assert any(quantized[k].dtype == FP8_DTYPE for k in quantized)
    # and the weights really changed (the test would be vacuous if nothing was quantized)
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert (got[name] - ref[name]).abs().max() > 0
