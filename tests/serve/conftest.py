"""Real API servers on loopback, started as subprocesses of ``matrixinfer serve`` (tests/serve/helpers.py)."""

from __future__ import annotations

import pytest

from matrixinfer.model.default_model import write_byte_tokenizer
from tests.checkpoints import make_checkpoint
from tests.serve.helpers import API_KEY, Server


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A tiny V3 checkpoint with a byte-level tokenizer (vocab 264 covers its 261 tokens)."""
    path = make_checkpoint(tmp_path_factory.mktemp("served"), "v3", seed=9, vocab_size=264,
                           bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(served_checkpoint):
    """A colocated server with a small KV cache, behind :data:`API_KEY`."""
    srv = Server(served_checkpoint, "--kv-cache-memory", str(8 << 20), api_key=API_KEY)
    yield srv
    srv.stop()

