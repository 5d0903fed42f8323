"""Real API servers on loopback, started as subprocesses of ``matrixinfer serve`` (tests/serve/helpers.py)."""

from __future__ import annotations

import pytest

from tests.serve.helpers import API_KEY, Server

# served_checkpoint (the tiny V3 checkpoint these servers load) is in tests/conftest.py


@pytest.fixture(scope="module")
def server(served_checkpoint):
    """A colocated server with a small KV cache, behind :data:`API_KEY`."""
    srv = Server(served_checkpoint, "--kv-cache-memory", str(8 << 20), api_key=API_KEY)
    yield srv
    srv.stop()

