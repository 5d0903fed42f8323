"""Compute backends are chosen once, at load: a loaded CPU float32 model runs the native kernels
where they apply, a model built directly runs PyTorch, and both compute the same thing."""

from __future__ import annotations

import pytest
import torch

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.backend import select_backend
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.loader import load_model
from tests.checkpoints import tiny_config
from tests.model.helpers import run_paged_steps

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the native kernels cannot be built")


def _backends(model: torch.nn.Module) -> set[str]:
    return {getattr(m, "backend", None) or m.impl.name for m in model.modules()
            if hasattr(m, "backend") or hasattr(m, "impl")}


def test_a_model_built_directly_runs_pytorch():
    model = DeepseekForCausalLM(ModelConfig.from_dict(tiny_config().to_dict()))
    assert _backends(model) == {"native", "torch"}


@needs_kernel
def test_load_model_binds_the_native_kernels_once(tiny_v3, tiny_v2):
    model = load_model(tiny_v3, progress=False)
    assert model.backend == "cpu" and all(b.backend == "cpu" for b in model.model.layers)
    assert {m.impl.name for m in model.modules() if hasattr(m, "impl")} == {"cpu-native"}
    v2 = load_model(tiny_v2, progress=False)  # no q LoRA, softmax routing: no one-call layers, no native router
    assert {b.backend for b in v2.model.layers} == {"native"}
    assert {type(m).__name__ for m in v2.modules() if getattr(m, "backend", "") == "native"} \
        == {"DeepseekForCausalLM", "Block", "Gate"}


@pytest.mark.parametrize("request_backend", ["auto", "native", "cpu"])
def test_every_backend_computes_the_same_decode_steps(tiny_v3, request_backend):
    """A prefill then decode steps over a paged cache: the same logits whichever backend runs."""
    model = load_model(tiny_v3, progress=False)
    chosen = select_backend(model, request_backend)
    if request_backend == "native" or not kernels.available():
        assert all(k.endswith((":native", ":torch")) for k in chosen), chosen
    cfg, bs = model.config, 4
    tables = torch.tensor([[5, 1, 7, 3], [0, 2, 4, 6]])

    def run(m: DeepseekForCausalLM) -> list[torch.Tensor]:
        cache = PagedLatentCache(m.num_cache_layers, 8, bs, cfg.kv_cache_dim)
        steps = [([7, 5], [7, 5]), ([1, 1], [8, 6]), ([1, 1], [9, 7])]
        with torch.no_grad():
            return [m.compute_logits(h) for h in run_paged_steps(m, cache, tables, steps)]

    reference = load_model(tiny_v3, progress=False)
    select_backend(reference, "native")
    for a, b in zip(run(model), run(reference)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_unknown_backends_are_refused():
    model = DeepseekForCausalLM(ModelConfig.from_dict(tiny_config().to_dict()), with_mtp=False)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        select_backend(model, "tpu")
    with pytest.raises(ValueError, match="unknown experts backend"):
        select_backend(model, "auto", experts="deepep")


@needs_kernel
def test_casting_after_selection_is_caught_not_read_as_float32(tiny_v3):
    """The native layers hold raw pointers: a model cast after its backend was chosen raises a
    clear error (choose again) instead of reading the new weights as float32."""
    model = load_model(tiny_v3, progress=False).double()
    cache = PagedLatentCache(model.num_cache_layers, 4, 4, model.config.kv_cache_dim, torch.float32)
    meta = AttentionMetadata.build([1], [1], torch.tensor([[0]]), 4)
    with torch.inference_mode(), pytest.raises(ValueError, match="must be a contiguous CPU torch.float32"):
        model(torch.tensor([3]), torch.tensor([0]), meta, cache)
    chosen = select_backend(model, "auto")  # float64: PyTorch, but for the router (float32 logits)
    assert [k for k in chosen if not k.endswith((":native", ":torch"))] == ["Gate:cpu"]
    cache = PagedLatentCache(model.num_cache_layers, 4, 4, model.config.kv_cache_dim, torch.float64)
    with torch.inference_mode():
        assert model(torch.tensor([3]), torch.tensor([0]), meta, cache).dtype is torch.float64


def test_a_dropped_model_is_freed_at_once():
    """Binding backends creates no reference cycles: a model's memory goes when its last reference
    does, not at some later garbage collection (engines are rebuilt, models reloaded)."""
    import gc
    import weakref

    model = DeepseekForCausalLM(ModelConfig.from_dict(tiny_config().to_dict()))
    select_backend(model, "cpu")
    gone = weakref.ref(model.model.layers[1].mlp.experts.gate_up_proj)
    gc.disable()
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()
