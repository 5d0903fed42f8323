"""Compute backends, chosen once when a model is loaded for inference (vLLM's ``CustomOp``).

A module with several implementations of one computation subclasses :class:`CustomOp` and
defines ``forward_native`` (plain PyTorch: differentiable, runs anywhere, the reference and what
training uses) and, where it has them, ``forward_cpu`` (the native C kernels of
:mod:`matrixinfer.kernels`) and ``forward_cuda``. :func:`select_backend` binds each module to one
of them from its parameters' device and dtype and from what is built, once; a module built
directly (training, tests) runs ``forward_native`` until then. The routed experts choose among the
:data:`~matrixinfer.model.experts.EXPERTS_BACKENDS` registry the same way, which is where the
expert-parallel backend plugs in.

Only what varies per call is decided per call: the batch size (small-batch kernels), the
attention metadata (the fused attention computes the absorbed form only), the KV cache passed in,
and whether autograd is recording (the native kernels have no backward, so with gradients on a
module bound to ``cpu`` runs ``forward_native``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from matrixinfer import kernels
from matrixinfer.model.experts import EXPERTS_BACKENDS, BackendUnavailable, Experts

log = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "cpu", "cuda")


class CustomOp(nn.Module):
    """A module with a PyTorch implementation and optional platform-specific ones, one of which
    :meth:`use_backend` binds; :meth:`forward` calls it with no further dispatch."""

    backend = "native"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # cooperative: Linear is CustomOp + nn.Linear
        # The function, not a bound method: a module holding a method of itself would be a
        # reference cycle, and a dropped model's memory would wait for the garbage collector.
        self._impl: Callable[..., Any] = type(self).forward_native

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._impl(self, *args, **kwargs)

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_cpu(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def forward_cuda(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def supports(self, backend: str) -> bool:
        """Whether ``forward_<backend>`` can run this module's parameters as they are now (device,
        dtype, layout) with what is built; ``native`` always can. Subclasses with a ``cpu`` or
        ``cuda`` implementation override this."""
        return backend == "native"

    def use_backend(self, backend: str) -> None:
        """Bind ``forward`` to ``forward_<backend>`` (which :meth:`supports` must allow)."""
        if backend not in ("native", "cpu", "cuda"):
            raise ValueError(f"unknown backend {backend!r}: expected native, cpu or cuda")
        self.backend = backend
        self._impl = CustomOp._cpu_unless_grad if backend == "cpu" else getattr(type(self), f"forward_{backend}")

    def _cpu_unless_grad(self, *args: Any, **kwargs: Any) -> Any:
        # The native kernels have no backward: training a loaded model runs the PyTorch path.
        if torch.is_grad_enabled():
            return self.forward_native(*args, **kwargs)
        return self.forward_cpu(*args, **kwargs)


def cpu_float32(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels can take ``tensors`` (float32, contiguous, on the CPU) and are built."""
    return all(t.is_cpu and t.dtype is torch.float32 and t.is_contiguous() for t in tensors) and kernels.available()


def _device_type(module: nn.Module) -> str:
    for t in module.parameters():
        return t.device.type
    for b in module.buffers():
        return b.device.type
    return "cpu"


def select_backend(model: nn.Module, backend: str = "auto", experts: str | None = None) -> dict[str, int]:
    """Bind every :class:`CustomOp` and :class:`~matrixinfer.model.experts.Experts` in ``model``
    to one implementation, once (call it again after moving or casting the model).

    ``backend``: ``native`` (PyTorch everywhere), ``cpu`` (the native kernels where a module's
    tensors are float32 CPU tensors and the kernels are built), ``cuda`` (CUDA implementations for
    modules on a CUDA device), or ``auto`` (``cpu`` or ``cuda`` after each module's device). A
    module that cannot run the requested backend runs ``native``. ``experts`` names an
    :data:`~matrixinfer.model.experts.EXPERTS_BACKENDS` entry for every MoE layer instead of the
    backend's default (the experts class's ``default_backends``, e.g. ``cpu-native`` for float and
    ``int8-cpu-native`` for INT8 experts on ``cpu``); it must be able to run them. Returns how many
    modules got each implementation (``"Experts:cpu-native"`` style keys for experts)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if experts is not None and experts not in EXPERTS_BACKENDS:
        raise ValueError(f"unknown experts backend {experts!r}: registered are {', '.join(EXPERTS_BACKENDS)}")
    chosen: Counter[str] = Counter()
    for module in model.modules():
        want = _device_type(module) if backend == "auto" else backend
        if isinstance(module, Experts):
            name = experts or module.default_backends.get(want, module.fallback_backend)
            try:
                module.use_backend(name)
            except BackendUnavailable as e:
                if experts is not None:
                    raise
                log.info("routed experts: %s unavailable (%s); using %s", name, e, module.fallback_backend)
                module.use_backend(module.fallback_backend)
            chosen[f"Experts:{module.impl.name}"] += 1
        elif isinstance(module, CustomOp):
            module.use_backend(want if want in ("cpu", "cuda") and module.supports(want) else "native")
            chosen[f"{type(module).__name__}:{module.backend}"] += 1
    log.info("compute backends (%s): %s", backend, ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items())))
    return dict(chosen)
