"""Import the Triton kernels as interpreted functions (CPU tensors), or skip the importing test module.

Triton decides when it is first imported whether its helpers and our kernels run in its
interpreter, so ``TRITON_INTERPRET=1`` is set before that, and every kernel module is imported
while it is set (one imported later, inside a test, would be compiled for a GPU); test modules
import this first.
"""

from __future__ import annotations

import os
import sys

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run tests/kernels in its own process",
                allow_module_level=True)
_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton (the cuda extra) is not installed")
    from matrixinfer.kernels.triton import decode_attention, kv_prolog, norm, prefill_attention  # noqa: F401
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """``kernels.triton.usable()`` accepts CPU tensors while a test runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MATRIXINFER_TRITON", raising=False)
