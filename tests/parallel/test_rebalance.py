"""Redundant experts and live expert rebalance in a running EP instance, over real gloo rank
processes: ``--ep 2 --redundant-experts 2`` starts with copies of two experts (a token routed to a
copied expert goes to one of its copies) and ``--eplb-interval 3`` re-places every MoE layer from
the load routed since the last plan, moving expert weights between the ranks at step boundaries
while requests run. Greedy outputs equal one process's (fp32 dispatch) and no request fails.
Costs ~10-20 s on 2 busy cores (one rank process starts)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.parallel.eplb import ReplicatedPlacement
from matrixinfer.parallel.launch import initial_placement, start_instance
from tests.checkpoints import make_checkpoint


def test_live_rebalance_with_redundant_experts_keeps_greedy_outputs(tmp_path):
    ck = make_checkpoint(tmp_path / "v3", "v3", seed=3, vocab_size=264, bos_token_id=256, eos_token_id=257,
                         n_routed_experts=8, num_hidden_layers=3)
    write_byte_tokenizer(ck)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (8,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cfg = EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=2 << 20, block_size=8,
                       max_num_batched_tokens=32)
    expect = LLMEngine(cfg).generate(prompts, params)
    # target 1.0: every plan whose balance improves is applied, so the placement keeps changing under load
    inst = start_instance(dataclasses.replace(cfg, ep=2, redundant_experts=2, eplb_interval=3, eplb_target=1.0))
    try:
        start = inst.engine.placements()
        assert all(ReplicatedPlacement.from_table(t, 8).n_redundant == 2 for t in start)
        got = inst.engine.generate(prompts, params)
        snap = inst.engine.load_snapshot()
        stats = inst.engine.stats()
    finally:
        inst.close()
    received = [r["experts_received"] for r in snap["ranks"]]
    print(f"live rebalances: {snap['rebalances']}, expert copies received per rank: {received}; "
          f"placement {start[0]} -> {snap['layers'][0]['slots']}")
    assert got == expect
    assert stats.generation_tokens == 24 * len(prompts)  # every request ran to its end
    assert snap["rebalances"] >= 1 and sum(received) >= 1
    assert [x["slots"] for x in snap["layers"]] != start
    assert all(r["tokens"] > 0 for r in snap["ranks"])


def test_redundant_experts_must_fill_the_ranks_evenly():
    p = initial_placement(4, 2, 2)
    assert [len(x) for x in p.slots] == [3, 3] and p.n_redundant == 2
    assert initial_placement(10, 4, 0).as_table() == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]  # contiguous
    with pytest.raises(ValueError, match="do not divide over 2 ranks"):
        initial_placement(4, 2, 1)
    with pytest.raises(ValueError, match="live rebalance needs the 10 routed experts"):
        initial_placement(10, 4, 0, live=True)
    with pytest.raises(ValueError, match="redundant_experts"):
        EngineConfig(redundant_experts=-1)
