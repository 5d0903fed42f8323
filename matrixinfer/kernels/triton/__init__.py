"""Triton kernels for the CUDA backend (``pip install matrixinfer[cuda]``).

The GPU counterparts of the PyTorch attention and norm paths, each one launch where the eager path
issues many small ones (docs/gpu.md):

- :func:`~.decode_attention.mla_decode`: latent-space (absorbed) MLA attention read straight from the paged cache
  through the block table, any number of tokens per sequence (decode, speculative verification),
  split over the keys for parallelism at small batches (flash-decoding);
- :func:`~.prefill_attention.varlen_prefill`: causal attention of the naive (expanded K/V) form over a whole flat
  batch of variable-length sequences, one call per layer;
- :func:`~.kv_prolog.mla_kv_prolog`: the new tokens' latents normed, rotated and stored in the cache;
- :func:`~.norm.rmsnorm` / :func:`~.norm.add_rmsnorm`: RMSNorm with the residual add fused in front.

Every kernel also runs under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which
is how CI checks them against the PyTorch paths without a GPU. :func:`usable` says whether the
kernels can take given tensors: Triton importable and the tensors on a CUDA device (or any device
while interpreting). This package imports nothing from Triton itself; its modules do, so import
them only where :func:`usable` said yes.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from matrixinfer import envs


def available() -> bool:
    """Whether Triton is installed (the ``cuda`` extra) and not turned off (``MATRIXINFER_TRITON=0``)."""
    return envs.triton_enabled() and importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``tensors``: Triton available and every tensor on a
    CUDA device, or on any device under the interpreter."""
    if not available():
        return False
    return interpreting() or all(t.is_cuda for t in tensors)

