"""The quantizer's pure decisions: which modules may be INT8, the smoothing formula and searches."""

import torch

from matrixinfer.quant.policy import (
    QuantRecipe,
    flag_sensitive,
    high_precision_by_default,
    may_be_int8,
    smoothing_scales,
)
from matrixinfer.quant.search import group_error, search_clip, search_smoothing


def test_module_policy():
    assert not may_be_int8("model.layers.3.self_attn.kv_b_proj")
    assert may_be_int8("model.layers.3.self_attn.kv_a_proj_with_mqa") and may_be_int8("lm_head")
    assert all(high_precision_by_default(n) for n in ("lm_head", "mtp.0.shared_head.head", "mtp.0.eh_proj"))
    assert not high_precision_by_default("model.layers.0.mlp.down_proj")
    assert flag_sensitive({"a": 0.01, "b": 0.0001, "c": -0.02}, 0.001) == {"a"}
    assert QuantRecipe().steps() == {"mixed_precision": True, "smooth": True, "rotate": False, "clip": True,
                                     "bias_correction": True}


def test_smoothing_scales_migrate_activation_outliers_into_weights():
    act = torch.tensor([1.0, 1.0, 50.0, 1.0])
    w = torch.ones(4)
    s = smoothing_scales(act, w, 0.5)
    assert torch.allclose(s.log().mean(), torch.tensor(0.0), atol=1e-6)  # normalised
    assert s[2] / s[0] > 7  # the outlier channel is divided by much more
    assert torch.equal(smoothing_scales(act, w, None), torch.ones(4))


def test_smoothing_search_helps_outlier_channels_and_leaves_benign_ones():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, 7] *= 40  # an activation outlier channel, as LLM activations have
    w = torch.randn(32, 64) * 0.1
    alpha, s, errors = search_smoothing(x.abs().amax(0), [(w, x)])
    assert alpha is not None and errors[f"{alpha:g}"] < errors["none"] / 3
    assert abs(group_error([(w, x)], s) - errors[f"{alpha:g}"]) < 1e-9
    benign = torch.randn(512, 64)
    alpha, _, errors = search_smoothing(benign.abs().amax(0), [(w, benign)])
    assert errors["none" if alpha is None else f"{alpha:g}"] <= errors["none"]


def test_clip_search_takes_the_smallest_error():
    best, errors = search_clip(lambda r: (r - 0.9) ** 2, (1.0, 0.95, 0.9, 0.8))
    assert best == 0.9 and len(errors) == 4
