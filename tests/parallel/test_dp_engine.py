"""DP attention + EP MoE over real gloo rank processes: greedy outputs of an instance of 2 and 4
ranks equal one process's, on tiny V3 and V2 checkpoints, with prompts of mixed lengths, chunked
prefill and preemption (a KV cache that cannot hold a rank's requests at once); --ep 4 on a model
with 4 routed experts is the one-expert-per-rank layout. The same runs cover expert load
balancing in the running instance: V3 at --ep 2 has 2 redundant experts (tokens of a copied expert
split over its copies), V2 at --ep 2 re-places its experts live every 3 steps (weights moved between
the ranks at step boundaries while the requests run). Costs ~60-120 s on 2 busy cores (rank
processes start and load the model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.parallel.launch import start_instance
from tests.checkpoints import make_checkpoint


def _checkpoint(path, arch: str):
    ck = make_checkpoint(path, arch, seed=3, vocab_size=264, bos_token_id=256, eos_token_id=257,
                         n_routed_experts=4, num_hidden_layers=3)
    write_byte_tokenizer(ck)
    return ck


def _prompts(n: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 250, (int(length),), generator=g).tolist()
            for length in torch.randint(3, 40, (n,), generator=g)]


def _run(cfg: EngineConfig, prompts, params):
    if cfg.ep == 1:
        eng = LLMEngine(cfg)
        return eng.generate(prompts, params), eng.stats(), {}
    inst = start_instance(cfg)
    try:
        out = inst.engine.generate(prompts, params)
        return out, inst.engine.stats(), inst.engine.load_snapshot()
    finally:
        inst.close()


# per run: --ep, and the expert-balancing settings
RUNS = {"v3": [(2, {"redundant_experts": 2}), (4, {})],
        # target 1.0: every re-plan that lowers the busiest rank's load is applied, so experts keep moving
        "v2": [(2, {"redundant_experts": 2, "eplb_interval": 3, "eplb_target": 1.0})]}


@pytest.mark.parametrize("arch", ["v3", "v2"])
def test_ep_instance_greedy_equals_one_process(tmp_path, arch):
    ck = _checkpoint(tmp_path / arch, arch)
    # 12 blocks of 8 tokens per rank (3 layers x 40 float32 per token): fewer than its requests
    # need at once (preemption); 16-token steps split the longer prompts (chunked prefill)
    cfg = EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=12 * 8 * 3 * 40 * 4,
                       block_size=8, max_num_batched_tokens=16, max_num_seqs=8)
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expect, ref_stats, _ = _run(cfg, prompts, params)
    assert ref_stats.preemptions > 0
    for ep, balancing in RUNS[arch]:
        got, stats, snap = _run(dataclasses.replace(cfg, ep=ep, **balancing), prompts, params)
        assert got == expect, f"--ep {ep} {balancing} differs from --ep 1"
        assert stats.generation_tokens == 24 * len(prompts)  # no request failed
        assert stats.preemptions > 0, f"--ep {ep}: no rank was short of KV blocks"
        if balancing.get("redundant_experts"):
            assert snap["redundant"] == 2 and all(len(r["experts"]) == 3 for r in snap["ranks"])
        if balancing.get("eplb_interval"):
            received = [r["experts_received"] for r in snap["ranks"]]
            print(f"{arch} --ep {ep}: {snap['rebalances']} live rebalances, expert copies received per rank "
                  f"{received}, layer 0 now {snap['layers'][0]['slots']}")
            assert snap["rebalances"] >= 1 and sum(received) >= 1
