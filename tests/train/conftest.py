"""Fixtures over the shipped demo checkpoint and the corpus it was trained on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from matrixinfer.train.demo import SHIPPED_DIR


@dataclass
class HeldoutSample:
    """Held-out windows and the bigram baseline fitted on the training files."""

    windows: torch.Tensor
    bigram_perplexity: float


@pytest.fixture(scope="session")
def demo_dir():
    if not (SHIPPED_DIR / "model.safetensors").exists():
        pytest.fail(f"{SHIPPED_DIR}: the shipped demo checkpoint is missing (run `matrixinfer train-demo`)")
    return SHIPPED_DIR


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    from matrixinfer.model.loader import load_model

    return load_model(demo_dir, progress=False)


@pytest.fixture(scope="session")
def heldout_sample(demo_dir) -> HeldoutSample:
    """32 held-out windows of 257 tokens, and a bigram model over the training files' tokens."""
    import json

    from tokenizers import Tokenizer

    from matrixinfer.train import corpus
    from matrixinfer.train.data import encode_files
    from matrixinfer.train.metrics import BigramModel, sample_windows

    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    tok_cfg = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|bos|>"
    heldout_percent = _heldout_percent(demo_dir)
    train_files, heldout_files = corpus.split(corpus.gather(), heldout_percent)
    # Encoding the ~11 MB of training files dominates the fixture: let the tokenizer use all cores.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        train_stream = encode_files(tok, train_files)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    windows = sample_windows(encode_files(tok, heldout_files), 257, 32)
    bigram = BigramModel(train_stream, tok.get_vocab_size())
    return HeldoutSample(windows, bigram.perplexity(windows))


def _heldout_percent(demo_dir) -> int:
    """The split the checkpoint was trained with, as recorded in CORPUS.md."""
    import re

    m = re.search(r'"heldout_percent": (\d+)', (demo_dir / "CORPUS.md").read_text())
    assert m, f"{demo_dir / 'CORPUS.md'} does not record heldout_percent"
    return int(m.group(1))
