"""Routed experts: the native kernel, the padded (all experts in one bmm) and the per-expert paths
equal a per-token reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matrixinfer import kernels
from matrixinfer.model.moe import Experts, Routing


def _reference(ex: Experts, x: torch.Tensor, r: Routing) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(r.topk_ids[t].tolist(), r.topk_weights[t]):
            gate, up = F.linear(x[t], ex.gate_up_proj[e]).chunk(2)
            out[t] += w * F.linear(F.silu(gate) * up, ex.down_proj[e])
    return out


@pytest.mark.parametrize("native,hidden,inter", [(False, 24, 16), (True, 24, 16), (True, 20, 12)])
def test_expert_paths_match_per_token_reference(monkeypatch, native, hidden, inter):
    """(20, 12): dimensions that are not a multiple of the kernel's vector width."""
    if native and not kernels.available():
        pytest.skip("no C compiler: the native kernel cannot be built")
    monkeypatch.setattr(kernels, "available", lambda: native)
    torch.manual_seed(0)
    ex = Experts(32, hidden, inter)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.2)
        ex.down_proj.normal_(0, 0.2)
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
    torch.manual_seed(1)
    ex = Experts(8, 16, 8)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.2)
        ex.down_proj.normal_(0, 0.2)
    x = torch.randn(12, 16)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(12)])
    ids[:, 0] = torch.where(ids[:, 0] == 5, 6, ids[:, 0])  # expert 5 gets no first choices
    r = Routing(ids, torch.rand(12, 2))
    with torch.no_grad():
        got = ex.grouped(x, r)
    assert (got - _reference(ex, x, r)).abs().max() < 1e-5
