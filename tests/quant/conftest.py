"""What the quantization tests share: calibration windows and one INT8 checkpoint of the tiny V3 model."""

from __future__ import annotations

import pytest
import torch

from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.loader import load_model
from matrixinfer.quant import quantizer as Q
from matrixinfer.quant.checkpoint import write_checkpoint
from matrixinfer.quant.policy import QuantRecipe


def windows(seed: int, n: int = 8, length: int = 33, vocab: int = 128) -> torch.Tensor:
    """``n`` random token windows (the tiny checkpoints are random: any tokens calibrate them)."""
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, w: torch.Tensor) -> torch.Tensor:
    """Next-token logits of every position of the windows ``w`` ``[n, length]``."""
    n, length = w.shape
    meta = AttentionMetadata.build([length] * n, device=w.device)
    with torch.no_grad():
        return model.compute_logits(model(w.reshape(-1), torch.arange(length, device=w.device).repeat(n), meta))


@pytest.fixture(scope="session")
def quantized(tiny_v3, tmp_path_factory):
    """The tiny V3 model quantized with every step (rotation included), its report, and its INT8
    checkpoint. Tests must not modify the model."""
    model = load_model(tiny_v3, progress=False)
    report = Q.Quantizer(model, windows(0), QuantRecipe(rotate=True), progress=False).run()
    out = write_checkpoint(model, tiny_v3, tmp_path_factory.mktemp("int8"), report.rotated, report.details())
    return model, report, out
