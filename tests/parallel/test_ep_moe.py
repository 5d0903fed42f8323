"""EP MoE over real gloo ranks (processes on loopback): a MoE layer whose experts are spread over
the ranks gives each rank's tokens the output the whole layer gives them in one process; one
rank with no tokens takes part with an empty batch. Costs ~15 s (three processes start)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from matrixinfer.config import ModelConfig
from matrixinfer.model.backend import select_backend
from matrixinfer.model.moe import MoE
from matrixinfer.parallel.dispatch import decode_rows, encode_rows, row_bytes
from matrixinfer.parallel.ep_moe import enable_expert_parallel
from matrixinfer.parallel.group import EPGroup, RankEnv
from matrixinfer.parallel.placement import ExpertPlacement, load_imbalance, rank_loads


def _cfg(n_experts: int) -> ModelConfig:
    return ModelConfig(architecture="DeepseekV3ForCausalLM", vocab_size=32, hidden_size=32, intermediate_size=48,
                       moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                       n_routed_experts=n_experts, n_shared_experts=1, num_experts_per_tok=2,
                       scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)


def _layer(n_experts: int) -> MoE:
    torch.manual_seed(0)
    moe = MoE(_cfg(n_experts))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    select_backend(moe, "auto")
    return moe.eval()


class _Model(torch.nn.Module):  # enable_expert_parallel walks model.layers[i].mlp
    def __init__(self, moe: MoE) -> None:
        super().__init__()
        block = torch.nn.Module()
        block.mlp = moe
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([block])


def _rank(rank: int, world: int, port: int, n_experts: int) -> None:
    torch.set_num_threads(1)
    moe = _layer(n_experts)
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expect = moe(x)
    group = EPGroup(RankEnv(rank, world, "127.0.0.1", port), ExpertPlacement.contiguous(n_experts, world))
    try:
        assert enable_expert_parallel(_Model(moe), group) == 1
        assert moe.experts.gate_up_proj.shape[0] == len(group.placement.experts_of(rank))
        bounds = [0, 9, 9, 17, 23][:world] + [23]  # rank 1 has no tokens
        mine = slice(bounds[rank], bounds[rank + 1])
        for dtype, tol in (("fp32", 1e-5), ("bf16", 3e-2), ("int8", 3e-2)):
            group.dispatch_dtype = dtype
            with torch.inference_mode():
                got = moe(x[mine])
                again = moe(x[mine])  # the reused buffers give the same result
            err = (got - expect[mine]).abs().max().item() if got.numel() else 0.0
            assert err <= tol * expect.abs().max().item(), f"rank {rank} {dtype}: max error {err}"
            assert torch.equal(got, again)
        assert int(group.expert_tokens.sum()) == 6 * 2 * got.shape[0]  # six passes, top-2
        assert group.dispatch_bytes > 0 or rank == 1
    finally:
        group.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ep_moe_equals_the_single_process_layer():
    """Three ranks over 8 experts (3, 3 and 2 each), in each dispatch dtype; one expert per rank
    is covered by test_dp_engine.py (--ep 4 on 4 experts)."""
    mp.spawn(_rank, args=(3, _free_port(), 8), nprocs=3, join=True)


def test_rows_round_trip_in_each_dispatch_dtype():
    x = torch.randn(5, 16) * 3
    ids = torch.tensor([[0, -1]] * 5)
    w = torch.rand(5, 2)
    for dtype, tol in (("fp32", 0.0), ("bf16", 0.02), ("int8", 0.02)):
        buf = encode_rows(x, ids, w, dtype, torch.empty(5, row_bytes(16, 2, dtype), dtype=torch.uint8))
        x2, ids2, w2 = decode_rows(buf, 16, 2, dtype, torch.float32)
        assert (x2 - x).abs().max() <= tol * x.abs().max()
        assert torch.equal(ids2, ids) and torch.equal(w2, w)
    assert row_bytes(7168, 8, "int8") / row_bytes(7168, 8, "bf16") <= 0.55


def test_placement_table():
    p = ExpertPlacement.contiguous(10, 4)
    assert p.as_table() == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert p.experts_per_rank == 3 and p.local_index()[4] == 1
    assert ExpertPlacement.contiguous(4, 6).as_table() == [[0], [1], [2], [3], [], []]
    assert ExpertPlacement.from_table([[3, 0], [1, 2]], 4).rank_of == (0, 1, 1, 0)
    with pytest.raises(ValueError, match="expert 0 is on ranks 0 and 1"):
        ExpertPlacement.from_table([[0, 1], [0]], 2)
    with pytest.raises(ValueError, match=r"expert\(s\) \[2\] are on no rank"):
        ExpertPlacement.from_table([[0, 1]], 3)
    two = ExpertPlacement.contiguous(4, 2)
    assert rank_loads(two, [5, 1, 2, 0]) == [6, 2]
    assert load_imbalance(two, [[5, 1, 2, 0], [1, 1, 1, 1]]) == pytest.approx((6 / 4 + 1.0) / 2)
    assert load_imbalance(ExpertPlacement.contiguous(2, 3), [[3, 1]]) == pytest.approx(1.5)  # rank 2 holds none
    assert load_imbalance(two, [[0, 0, 0, 0]]) == 1.0
