"""The routed experts of a DeepSeekMoE layer and the backends that compute them.

:class:`Experts` holds the weights, stacked; an :class:`ExpertsBackend` computes
``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` for a :class:`Routing`. Backends live in one
registry (:data:`EXPERTS_BACKENDS`): ``torch`` (PyTorch, any device, differentiable),
``cpu-native`` (one native call per layer) and ``cuda-grouped`` (two grouped matmuls, no host
synchronisation). :class:`Int8Experts` holds INT8 (W8A8) weights and has its own entries
(``int8-torch``, ``int8-cpu-native``). :func:`matrixinfer.model.backend.select_backend` picks one per
layer when the model is loaded. An expert-parallel backend is one more entry: its ``forward`` dispatches each
token to the ranks holding its experts, runs this rank's experts, and combines the results (the
MoE layer already routes before calling the experts, so dispatch/combine sit between the two).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from matrixinfer import kernels
from matrixinfer.quant.int8 import w8a8_linear


@dataclass
class Routing:
    """Each token's chosen experts ``topk_ids [T, k]`` and their combine weights ``topk_weights [T, k]``."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


class BackendUnavailable(RuntimeError):
    """An experts backend cannot run these experts (device, dtype, build, a failed probe)."""


class ExpertsBackend(ABC):
    """How one MoE layer's routed experts are computed; made for one :class:`Experts` by
    :meth:`Experts.use_backend`. The constructor raises :class:`BackendUnavailable` when the
    backend cannot run these experts as they are (device, dtype, what is built)."""

    name: ClassVar[str]
    differentiable: ClassVar[bool] = True  # False: with gradients on, the torch backend runs instead

    def __init__(self, experts: Experts) -> None:
        self._experts = weakref.ref(experts)  # not the module itself: it holds this backend

    @property
    def experts(self) -> Experts:
        """The layer whose weights this backend computes with (its current parameters)."""
        experts = self._experts()
        if experts is None:
            raise RuntimeError("the Experts module of this backend no longer exists")
        return experts

    @abstractmethod
    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``[T, hidden]`` routed-expert output of ``x`` ``[T, hidden]``."""


#: name -> factory; a factory may be a class or, for a backend that needs more (a process group,
#: a placement), a ``functools.partial`` of one
EXPERTS_BACKENDS: dict[str, Callable[[Experts], ExpertsBackend]] = {}


def register_experts_backend(name: str, factory: Callable[[Experts], ExpertsBackend]) -> None:
    """Make ``factory`` selectable as ``select_backend(model, ..., experts=name)``."""
    EXPERTS_BACKENDS[name] = factory


class Experts(nn.Module):
    """Routed experts stored stacked: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``,
    computed by the backend :meth:`use_backend` chose (``torch`` until then)."""

    #: the backend each compute backend of select_backend uses where it can, and the one that always can
    default_backends: ClassVar[dict[str, str]] = {"native": "torch", "cpu": "cpu-native", "cuda": "cuda-grouped"}
    fallback_backend: ClassVar[str] = "torch"

    def __init__(self, n_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.impl: ExpertsBackend = EXPERTS_BACKENDS[self.fallback_backend](self)

    def use_backend(self, name: str) -> None:
        """Compute with the registered backend ``name`` (raises :class:`BackendUnavailable`)."""
        if name not in EXPERTS_BACKENDS:
            raise ValueError(f"unknown experts backend {name!r}: registered are {', '.join(EXPERTS_BACKENDS)}")
        self.impl = EXPERTS_BACKENDS[name](self)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        impl = self.impl
        if not impl.differentiable and torch.is_grad_enabled():
            impl = EXPERTS_BACKENDS[self.fallback_backend](self)
        return impl.forward(x, routing)


class Int8Experts(Experts):
    """Routed experts with INT8 weights and activations (W8A8; :mod:`matrixinfer.quant.format`),
    stacked as the float ones: ``gate_up_proj`` int8 ``[E, 2I, H]`` with ``gate_up_proj_scale``
    ``[E, 2I, 1]``, ``down_proj`` int8 ``[E, H, I]`` with ``down_proj_scale`` ``[E, H, 1]``; optional
    error-compensation biases ``*_bias`` (``[E, 2I]``, ``[E, H]``) and smoothing vectors
    ``*_pre_quant_scale`` (``[E, H]``, ``[E, I]``). All are buffers (the model's dtype cast leaves
    them alone). Activations are quantized per token (the SwiGLU output again before ``down``)."""

    default_backends: ClassVar[dict[str, str]] = {"native": "int8-torch", "cpu": "int8-cpu-native",
                                                  "cuda": "int8-torch"}
    fallback_backend: ClassVar[str] = "int8-torch"
    gate_up_proj_scale: torch.Tensor
    down_proj_scale: torch.Tensor
    gate_up_proj_bias: torch.Tensor | None
    down_proj_bias: torch.Tensor | None
    gate_up_proj_pre_quant_scale: torch.Tensor | None
    down_proj_pre_quant_scale: torch.Tensor | None

    def __init__(self, n_experts: int, hidden: int, inter: int, bias: bool = False,
                 pre_quant_scale: bool = False) -> None:
        nn.Module.__init__(self)  # no float parameters: the INT8 buffers take their names
        self.n_experts, self.inter, self.hidden = n_experts, inter, hidden
        e = n_experts
        for name, shape, dtype in (("gate_up_proj", (e, 2 * inter, hidden), torch.int8),
                                   ("gate_up_proj_scale", (e, 2 * inter, 1), torch.float32),
                                   ("down_proj", (e, hidden, inter), torch.int8),
                                   ("down_proj_scale", (e, hidden, 1), torch.float32)):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.register_buffer("gate_up_proj_bias", torch.zeros(e, 2 * inter) if bias else None)
        self.register_buffer("down_proj_bias", torch.zeros(e, hidden) if bias else None)
        self.register_buffer("gate_up_proj_pre_quant_scale", torch.ones(e, hidden) if pre_quant_scale else None)
        self.register_buffer("down_proj_pre_quant_scale", torch.ones(e, inter) if pre_quant_scale else None)
        self.impl = EXPERTS_BACKENDS[self.fallback_backend](self)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on the rows ``x`` ``[n, H]`` (float32 result): the reference computation."""
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[e]

        gu = w8a8_linear(x, self.gate_up_proj[e], self.gate_up_proj_scale[e], opt(self.gate_up_proj_bias),
                         opt(self.gate_up_proj_pre_quant_scale))
        gate, up = gu.chunk(2, dim=-1)
        return w8a8_linear(F.silu(gate) * up, self.down_proj[e], self.down_proj_scale[e], opt(self.down_proj_bias),
                           opt(self.down_proj_pre_quant_scale))


class Int8TorchExperts(ExpertsBackend):
    """INT8 experts in PyTorch on any device: tokens sorted by expert, then each expert with tokens
    runs :meth:`Int8Experts.expert` (``torch._int_mm`` on CUDA). One call per active expert, with
    the per-expert counts read on the host: there is no grouped INT8 GEMM in PyTorch."""

    name = "int8-torch"

    def __init__(self, experts: Experts) -> None:
        super().__init__(experts)
        if not isinstance(experts, Int8Experts):
            raise BackendUnavailable("int8-torch computes Int8Experts; these experts are not quantized")

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        ex = self.experts
        assert isinstance(ex, Int8Experts)
        t, k = routing.topk_ids.shape
        flat_ids = routing.topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        xs = x[token_of]
        ys = torch.empty(xs.shape, dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(torch.bincount(flat_ids, minlength=ex.n_experts).tolist()):
            if n:
                ys[start:start + n] = ex.expert(e, xs[start:start + n])
                start += n
        w = routing.topk_weights.reshape(-1)[order].float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, ys * w[:, None])
        return out.to(x.dtype)


class Int8NativeExperts(ExpertsBackend):
    """All INT8 routed experts of the layer in one native call (``moe_w8a8.c``); CPU, float32 activations."""

    name = "int8-cpu-native"
    differentiable = False

    def __init__(self, experts: Experts) -> None:
        super().__init__(experts)
        if not isinstance(experts, Int8Experts):
            raise BackendUnavailable("int8-cpu-native computes Int8Experts; these experts are not quantized")
        if not kernels.available():
            raise BackendUnavailable("the native CPU kernels are not built")
        if not experts.gate_up_proj.is_cpu:
            raise BackendUnavailable(f"expert weights are on {experts.gate_up_proj.device}, not the CPU")

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        ex = self.experts
        assert isinstance(ex, Int8Experts)
        if x.dtype is not torch.float32:
            return Int8TorchExperts(ex).forward(x, routing)
        return kernels.moe_experts_w8a8(
            x.contiguous(), routing.topk_ids.contiguous(), routing.topk_weights.float().contiguous(), ex.gate_up_proj,
            ex.gate_up_proj_scale, ex.down_proj, ex.down_proj_scale, ex.gate_up_proj_bias, ex.down_proj_bias,
            ex.gate_up_proj_pre_quant_scale, ex.down_proj_pre_quant_scale)


class TorchExperts(ExpertsBackend):
    """PyTorch on any device: tokens sorted by expert, then one padded batched matmul per
    projection (decode-sized batches) or one matmul per expert over its slice (skewed loads)."""

    name = "torch"

    def __init__(self, experts: Experts) -> None:
        super().__init__(experts)
        if not experts.gate_up_proj.is_floating_point():
            raise BackendUnavailable(f"torch experts need floating-point weights, not {experts.gate_up_proj.dtype}")

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        ex = self.experts
        t, k = routing.topk_ids.shape
        flat_ids = routing.topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_ids, minlength=ex.n_experts)
        xs = x[token_of]
        cap = int(counts.max())
        # One padded bmm per projection runs the padding rows too; one matmul per expert pays a call
        # (~30 us on a CPU) twice per expert. Pad while the wasted multiply-adds cost less than the
        # calls (about 0.8M MACs per expert at ~80 GFLOP/s): decode batches, not skewed prefills.
        if (cap * ex.n_experts - t * k) * x.shape[1] * ex.inter <= ex.n_experts * 800_000:
            ys = self._padded(xs, flat_ids[order], counts, cap)
        else:  # skewed load: one matmul per expert over its contiguous slice
            ys = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n == 0:
                    continue
                chunk = xs[start:start + n]
                gate, up = F.linear(chunk, ex.gate_up_proj[e]).chunk(2, dim=-1)
                ys[start:start + n] = F.linear(F.silu(gate) * up, ex.down_proj[e])
                start += n
        w = routing.topk_weights.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, ys * w[:, None])
        return out

    def _padded(self, xs: torch.Tensor, sorted_ids: torch.Tensor, counts: torch.Tensor, cap: int) -> torch.Tensor:
        """All experts at once on an ``[E, cap, H]`` layout (rows sorted by expert, zero padding)."""
        ex = self.experts
        n = xs.shape[0]
        starts = counts.cumsum(0) - counts
        slot = sorted_ids * cap + (torch.arange(n, device=xs.device) - starts[sorted_ids])
        padded = xs.new_zeros(ex.n_experts * cap, xs.shape[1]).index_copy_(0, slot, xs)
        padded = padded.view(ex.n_experts, cap, -1)
        gate, up = torch.bmm(padded, ex.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, ex.down_proj.transpose(1, 2))
        return y.reshape(ex.n_experts * cap, -1).index_select(0, slot)


class NativeExperts(ExpertsBackend):
    """All routed experts of the layer in one native call (``moe.c``): bucketing, both
    projections and the weighted combine; float32 CPU weights."""

    name = "cpu-native"
    differentiable = False

    def __init__(self, experts: Experts) -> None:
        super().__init__(experts)
        if not kernels.available():
            raise BackendUnavailable("the native CPU kernels are not built")
        for w in (experts.gate_up_proj, experts.down_proj):  # (int8 experts have their own backend)
            if not w.is_cpu or w.dtype is not torch.float32 or not w.is_contiguous():
                raise BackendUnavailable(f"expert weights are {w.dtype} on {w.device}: contiguous float32 "
                                         "on the CPU expected")

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        ex = self.experts
        return kernels.moe_experts(x.contiguous(), routing.topk_ids.contiguous(),
                                   routing.topk_weights.float().contiguous(), ex.gate_up_proj, ex.down_proj)


class GroupedMMExperts(ExpertsBackend):
    """All experts as two grouped matmuls (``torch._grouped_mm``) over the rows sorted by expert,
    with the group offsets kept on the device: no host synchronisation (the CUDA path). Probed
    once on the experts' device and dtype when chosen."""

    name = "cuda-grouped"

    def __init__(self, experts: Experts) -> None:
        super().__init__(experts)
        w = experts.gate_up_proj
        if not w.is_floating_point():
            raise BackendUnavailable(f"grouped matmul experts need floating-point weights, these are {w.dtype}")
        one = Routing(torch.zeros(1, 1, dtype=torch.long, device=w.device), torch.ones(1, 1, device=w.device))
        try:
            with torch.no_grad():
                self.forward(w.new_zeros(1, w.shape[2]), one)
        except (AttributeError, RuntimeError, NotImplementedError) as e:  # no _grouped_mm, or not for this device/dtype
            raise BackendUnavailable(f"grouped matmul on {w.device} {w.dtype}: {e}") from e

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        ex = self.experts
        flat_ids = routing.topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of = order // routing.topk_ids.shape[1]
        counts = torch.zeros(ex.n_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        gate, up = torch._grouped_mm(x[token_of], ex.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, ex.down_proj.transpose(1, 2), offs=offs)
        w = routing.topk_weights.reshape(-1)[order].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys * w[:, None])


for _backend in (TorchExperts, NativeExperts, GroupedMMExperts, Int8TorchExperts, Int8NativeExperts):
    register_experts_backend(_backend.name, _backend)
