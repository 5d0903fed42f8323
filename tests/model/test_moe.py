"""Routed experts: every experts backend (native kernel, PyTorch's padded and per-expert paths,
grouped matmuls) equals a per-token reference, and backends are chosen once, by name."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from matrixinfer import kernels
from matrixinfer.model.backend import select_backend
from matrixinfer.model.experts import (
    EXPERTS_BACKENDS,
    BackendUnavailable,
    ExpertsBackend,
    GroupedMMExperts,
    TorchExperts,
)
from matrixinfer.model.moe import Experts, Routing


def _reference(ex: Experts, x: torch.Tensor, r: Routing) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(r.topk_ids[t].tolist(), r.topk_weights[t]):
            gate, up = F.linear(x[t], ex.gate_up_proj[e]).chunk(2)
            out[t] += w * F.linear(F.silu(gate) * up, ex.down_proj[e])
    return out


def _experts(n: int, hidden: int, inter: int, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(n, hidden, inter)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.2)
        ex.down_proj.normal_(0, 0.2)
    return ex


@pytest.mark.parametrize("backend,hidden,inter", [("native", 24, 16), ("cpu", 24, 16), ("cpu", 20, 12)])
def test_expert_paths_match_per_token_reference(backend, hidden, inter):
    """(20, 12): dimensions that are not a multiple of the kernel's vector width."""
    if backend == "cpu" and not kernels.available():
        pytest.skip("no C compiler: the native kernel cannot be built")
    ex = _experts(32, hidden, inter)
    assert select_backend(ex, backend) == {f"Experts:{'cpu-native' if backend == 'cpu' else 'torch'}": 1}
    for tokens, skew in ((5, False), (40, False), (40, True)):
        x = torch.randn(tokens, hidden)
        ids = torch.stack([torch.randperm(32)[:2] for _ in range(tokens)])
        if skew:  # every token's first choice is expert 3: the padded layout would be mostly padding
            ids[:, 0] = 3
            ids[:, 1] = torch.where(ids[:, 1] == 3, torch.full_like(ids[:, 1], 4), ids[:, 1])
        r = Routing(ids, torch.rand(tokens, 2))
        expect = _reference(ex, x, r)
        with torch.no_grad():
            got = ex(x, r)
        assert (got - expect).abs().max() < 1e-5, (tokens, skew)


def test_grouped_matmul_path_matches_per_token_reference():
    """The host-synchronisation-free path CUDA uses (torch._grouped_mm), checked on CPU."""
    ex = _experts(8, 16, 8, seed=1)
    try:
        grouped = GroupedMMExperts(ex)
    except BackendUnavailable as e:  # an older torch without _grouped_mm
        pytest.skip(str(e))
    x = torch.randn(12, 16)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(12)])
    ids[:, 0] = torch.where(ids[:, 0] == 5, 6, ids[:, 0])  # expert 5 gets no first choices
    r = Routing(ids, torch.rand(12, 2))
    with torch.no_grad():
        got = grouped.forward(x, r)
    assert (got - _reference(ex, x, r)).abs().max() < 1e-5


def test_cuda_backend_falls_back_when_grouped_matmul_is_unavailable(monkeypatch):
    """The grouped matmul is probed once, when the backend is chosen: where it fails, the layer
    computes with the torch backend from then on (no per-call try/except, no global flag)."""
    def unsupported(*args, **kwargs):
        raise NotImplementedError("grouped_mm: not for this device")

    monkeypatch.setattr(torch, "_grouped_mm", unsupported, raising=False)
    ex = _experts(4, 8, 4)
    assert select_backend(ex, "cuda") == {"Experts:torch": 1}
    with pytest.raises(BackendUnavailable, match="grouped matmul"):
        select_backend(ex, "cuda", experts="cuda-grouped")  # named explicitly: an error, not a fallback


def test_a_registered_backend_is_selectable_by_name(monkeypatch):
    """How an expert-parallel backend plugs in: one registry entry (a factory taking the layer's
    Experts, e.g. a functools.partial carrying a process group), chosen with experts=<name>."""
    class Recording(ExpertsBackend):
        name = "recording"

        def __init__(self, experts: Experts, log: list) -> None:
            super().__init__(experts)
            self.log = log

        def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
            self.log.append(x.shape[0])
            return TorchExperts(self.experts).forward(x, routing)

    log: list = []
    monkeypatch.setitem(EXPERTS_BACKENDS, "recording", functools.partial(Recording, log=log))
    ex = _experts(4, 8, 4)
    assert select_backend(ex, "auto", experts="recording") == {"Experts:recording": 1}
    x, r = torch.randn(3, 8), Routing(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    torch.testing.assert_close(ex(x, r), _reference(ex, x, r))
    assert log == [3]
    with pytest.raises(ValueError, match="unknown experts backend"):
        select_backend(ex, "auto", experts="nope")
