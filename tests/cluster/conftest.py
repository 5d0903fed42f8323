"""Fixtures of the cluster layer's tests: a served tiny checkpoint (as tests/serve uses)."""

from __future__ import annotations

import pytest

from matrixinfer.model.default_model import write_byte_tokenizer
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A tiny V3 checkpoint with a byte-level tokenizer (vocab 264 covers its 261 tokens)."""
    path = make_checkpoint(tmp_path_factory.mktemp("served"), "v3", seed=9, vocab_size=264,
                           bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(path)
    return path
