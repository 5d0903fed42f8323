"""The INT8 path on CUDA (``pytest -m cuda``; skipped with a reason where no GPU is visible):
``torch._int_mm`` computes the exact integer sums the CPU path computes, and an INT8 checkpoint
loads and runs on the GPU with its linears on ``torch._int_mm``."""

from __future__ import annotations

import pytest
import torch

from matrixinfer.model.loader import load_model
from matrixinfer.quant import int8 as int8_ops
from matrixinfer.quant import quantizer as Q
from matrixinfer.quant.checkpoint import write_checkpoint
from matrixinfer.quant.int8 import quantize_rows, quantize_weight, w8a8_linear
from tests.quant.conftest import logits, windows

pytestmark = pytest.mark.cuda  # skipped where no GPU is visible (tests/conftest.py)


@pytest.mark.parametrize("m", [1, 16, 17, 64, 300])
def test_int_mm_gives_the_exact_integer_sums(m):
    torch.manual_seed(m)
    xq, _ = quantize_rows(torch.randn(m, 256))
    wq, _ = quantize_weight(torch.randn(96, 256))
    got = int8_ops.int8_mm(xq.cuda(), wq.cuda())
    assert int8_ops._INT_MM_OK[(str(xq.cuda().device), 256, 96)] is True
    assert torch.equal(got.cpu(), (xq.long() @ wq.long().T).float())


def test_w8a8_linear_on_cuda_matches_the_cpu(tiny_v3):
    x, w = torch.randn(40, 128), torch.randn(64, 128)
    q, s = quantize_weight(w)
    cpu = w8a8_linear(x, q, s)
    assert torch.allclose(w8a8_linear(x.cuda(), q.cuda(), s.cuda()).cpu(), cpu, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_checkpoint_runs_on_cuda(tiny_v3, tmp_path, dtype):
    model = load_model(tiny_v3, progress=False)
    report = Q.Quantizer(model, windows(0), progress=False).run()
    out = write_checkpoint(model, tiny_v3, tmp_path / "int8", report.rotated, report.details())
    cpu = load_model(out, progress=False)
    gpu = load_model(out, dtype=dtype, device="cuda", progress=False)
    assert gpu.model.layers[0].self_attn.q_a_proj.backend == "cuda"
    w = windows(1, n=2, length=24)
    ref = logits(cpu, w)
    got = logits(gpu, w.cuda()).cpu()
    tol = 1e-3 if dtype is torch.float32 else 0.1
    assert (got - ref).norm() / ref.norm() < tol
