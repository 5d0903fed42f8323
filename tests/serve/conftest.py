"""Real API servers on loopback, started as subprocesses of ``matrixinfer serve``."""

from __future__ import annotations

import os

import pytest

from matrixinfer.bench.launch import ServerProcess
from matrixinfer.model.default_model import write_byte_tokenizer
from tests.checkpoints import make_checkpoint

API_KEY = "test-key-123"


class Server(ServerProcess):
    """``matrixinfer serve`` on a test checkpoint, served as ``tiny`` (colocated unless PDC flags are given)."""

    def __init__(self, model_dir, *extra: str, api_key: str | None = None) -> None:
        args = ["--model", str(model_dir), "--served-model-name", "tiny",
                "--log-level", os.environ.get("MI_TEST_LOG", "warning"), *extra]
        if "--num-prefill" not in extra:
            args.append("--colocated")
        if api_key:
            args += ["--api-key", api_key]
        self.api_key = api_key
        super().__init__(args, env={"MATRIXINFER_THREADS": "1"}, timeout=180)


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A tiny V3 checkpoint with a byte-level tokenizer (vocab 264 covers its 261 tokens)."""
    path = make_checkpoint(tmp_path_factory.mktemp("served"), "v3", seed=9, vocab_size=264,
                           bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(served_checkpoint):
    srv = Server(served_checkpoint, "--kv-cache-memory", str(8 << 20), api_key=API_KEY)
    yield srv
    srv.stop()



def child_pid(server: Server, needle: str, index: int = 0) -> int:
    """PID of the ``index``-th child whose command line contains ``needle``."""
    return server.child_pid(needle, index)


def instance_metrics(server: Server) -> dict[str, dict[str, float]]:
    """``{metric: {instance: value}}`` of the per-instance gauges."""
    return server.instance_metrics()
