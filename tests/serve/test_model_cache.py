"""Warm start from the EMS model cache: the model built from the pool equals the one from files."""

from __future__ import annotations

import torch

from matrixinfer.ems.client import EmsClient
from matrixinfer.model.loader import load_model
from matrixinfer.serve.pool import checkpoint_version, load_model_via_pool, publish_tensors
from tests.helpers import spawn


def test_model_from_pool_equals_model_from_files(served_checkpoint):
    proc, addr = spawn(["--capacity", "64M", "--listen", "127.0.0.1:0"])
    try:
        with EmsClient([addr], namespace="matrixinfer") as client:
            assert load_model_via_pool(client, served_checkpoint, "tiny", torch.float32)[0] is None  # a miss
            assert publish_tensors(client, served_checkpoint, "tiny", checkpoint_version(served_checkpoint)) > 0
            # float32 lands in the parameters in place; bfloat16 goes through the loader's conversion
            for dtype in (torch.float32, torch.bfloat16):
                warm, _ = load_model_via_pool(client, served_checkpoint, "tiny", dtype)
                cold = load_model(served_checkpoint, dtype=dtype, progress=False)
                a, b = warm.state_dict(), cold.state_dict()
                assert a.keys() == b.keys()
                assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    finally:
        proc.terminate()  # a clean exit unlinks its arena
        proc.wait(timeout=10)
