"""Two-microbatch overlap (``--microbatches 2``): the batch cut (between whole sequences where one
boundary is near half the tokens; a prefill chunk cut in two attends to its first part through the
paged cache), the turn scheduler (turns alternate in a fixed order, a failing microbatch stops the
other, hundreds of runs of uneven microbatches hand over cleanly), and an EP instance of real gloo
rank processes whose greedy outputs with two microbatches equal one process's, with chunked
prefill, mixed prompt lengths and idle ranks. The last costs ~40-80 s on 2 busy cores (rank
processes start)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from matrixinfer.config import EngineConfig, ModelConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.backend import select_backend
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.parallel.launch import start_instance
from matrixinfer.parallel.microbatch import TurnScheduler, cut_point, split_batch
from tests.checkpoints import make_checkpoint, tiny_config


def _model() -> DeepseekForCausalLM:
    torch.manual_seed(0)
    model = DeepseekForCausalLM(ModelConfig.from_dict(tiny_config("v3").to_dict())).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    select_backend(model, "auto")
    return model


def test_cut_falls_between_sequences_near_the_half_else_inside_one():
    assert cut_point([1] * 7) == 3  # decode: half the sequences
    assert cut_point([128] * 4) == 256
    assert cut_point([6, 5, 7]) == 11  # the boundary nearest 9, 7 of 18 tokens on the smaller side
    assert cut_point([300, 100, 112]) == 300
    assert cut_point([13]) == 6  # one sequence: cut inside
    assert cut_point([3, 1, 9, 1]) == 7  # the nearest boundary (4 of 14) is too uneven: inside the 3rd
    assert cut_point([400, 112]) == 256


@pytest.mark.parametrize("query_lens,cached", [([1] * 7, [5, 9, 1, 3, 12, 4, 6]),  # decode: half the sequences
                                               ([13], [4]),  # one prefill chunk, cut inside
                                               ([3, 1, 9, 1], [0, 7, 2, 5]),  # mixed, cut inside the 3rd
                                               ([6, 5, 7], [0, 3, 0])])  # between the 2nd and 3rd
def test_split_batch_computes_what_the_whole_batch_computes(query_lens, cached):
    model = _model()
    cfg = model.config
    block = 4
    ctx = [q + c for q, c in zip(query_lens, cached)]
    width = max(-(-c // block) for c in ctx)
    tables = torch.arange(len(ctx) * width, dtype=torch.int32).view(len(ctx), width)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, cfg.vocab_size, (sum(cached),), generator=g)
    new = torch.randint(0, cfg.vocab_size, (sum(query_lens),), generator=g)
    caches = [PagedLatentCache(model.num_cache_layers, len(ctx) * width, block, cfg.kv_cache_dim) for _ in range(2)]
    with torch.inference_mode():
        if sum(cached):  # the cached prefixes, written by a forward pass of their own
            pre = [c for c in cached if c]
            meta = AttentionMetadata.build(pre, pre, tables[[i for i, c in enumerate(cached) if c]], block)
            pos = torch.cat([torch.arange(c) for c in pre])
            for cache in caches:
                model(prefix, pos, meta, cache)
        pos = torch.cat([torch.arange(c, c + q) for q, c in zip(query_lens, cached)])
        meta = AttentionMetadata.build(query_lens, ctx, tables, block)
        whole = model(new, pos, meta, caches[0])
        split = split_batch(meta)
        assert split is not None and split.tokens == cut_point(query_lens)
        n = split.tokens
        first = model(new[:n], pos[:n], split.first, caches[1])
        second = model(new[n:], pos[n:], split.second, caches[1])
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].data, caches[0].data, rtol=1e-5, atol=1e-5)


def test_split_batch_refuses_what_it_cannot_cut():
    assert split_batch(AttentionMetadata.build([1], [3], torch.zeros(1, 1, dtype=torch.int32), 4)) is None
    assert split_batch(AttentionMetadata.build([6], [6])) is None  # no paged cache


def test_turns_alternate_and_a_failure_stops_both():
    turns = TurnScheduler(2)
    log: list[str] = []

    def mb(name: str, steps: int, fail_at: int | None = None):
        def run():
            for i in range(steps):
                log.append(f"{name}{i}")
                if i == fail_at:
                    raise ValueError(f"{name} failed")
                turns.pause()
            return name
        return run

    try:
        assert turns.run([mb("a", 3), mb("b", 3)]) == ["a", "b"]
        assert log == ["a0", "b0", "a1", "b1", "a2", "b2"]
        log.clear()
        assert turns.run([mb("a", 1), mb("b", 3)]) == ["a", "b"]  # b runs on alone once a is done
        assert log == ["a0", "b0", "b1", "b2"]
        log.clear()
        with pytest.raises(ValueError, match="b failed"):
            turns.run([mb("a", 5), mb("b", 5, fail_at=1)])
        assert log == ["a0", "b0", "a1", "b1"]  # a stopped at its next turn
        assert turns.run([mb("a", 1), mb("b", 1)]) == ["a", "b"]  # usable again
        log.clear()
        with pytest.raises(ValueError, match="a failed"):  # the failure, not the other's abort, is raised
            turns.run([mb("a", 2, fail_at=0), mb("b", 2)])
        assert log == ["a0"]  # b never started
    finally:
        turns.close()


def test_turns_hand_over_cleanly_over_many_uneven_runs():
    turns = TurnScheduler(2)
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(300):
            steps = torch.randint(0, 4, (2,), generator=g).tolist()
            log: list[int] = []

            def mb(i: int, n: int, log: list[int] = log):
                def run():
                    for _ in range(n):
                        log.append(i)
                        turns.pause()
                    return i
                return run

            assert turns.run([mb(0, steps[0]), mb(1, steps[1])]) == [0, 1]
            # alternate while both run, then the longer one alone
            both = min(steps)
            assert log[:2 * both] == [0, 1] * both and log[2 * both:] == [int(steps[1] > steps[0])] * abs(
                steps[0] - steps[1])
    finally:
        turns.close()


def test_ep_instance_with_two_microbatches_equals_one_process(tmp_path):
    ck = make_checkpoint(tmp_path / "v3", "v3", seed=3, vocab_size=264, bos_token_id=256, eos_token_id=257,
                         n_routed_experts=4, num_hidden_layers=3)
    write_byte_tokenizer(ck)
    # 16-token steps: longer prompts are chunked, and chunks are cut between the microbatches; 9 prompts
    # over 2 ranks, so the ranks' batches differ (one token, several, none at the end)
    cfg = EngineConfig(model=str(ck), device="cpu", dtype="float32", kv_cache_memory=1 << 20, block_size=8,
                       max_num_batched_tokens=16, max_num_seqs=8)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (9,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expect = LLMEngine(cfg).generate(prompts, params)
    inst = start_instance(dataclasses.replace(cfg, ep=2, microbatches=2))
    try:
        got = inst.engine.generate(prompts, params)
        stats, snap = inst.engine.stats(), inst.engine.load_snapshot()
        turns = inst.engine.group.turns
        assert turns is not None and turns.runs > 0
        # microbatches took turns at every dispatch and combine: 2 per MoE layer each
        assert turns.switches >= turns.runs * 2 * 2 * 2
    finally:
        inst.close()
    assert got == expect, "--ep 2 --microbatches 2 differs from one process"
    assert stats.generation_tokens == 16 * len(prompts)
    assert all(r["tokens"] > 0 for r in snap["ranks"])  # both ranks computed requests
