"""Our runtime against transformers' own DeepSeek-V2/V3 implementations on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.generate import generate
from matrixinfer.model.loader import load_model
from tests.checkpoints import load_reference, make_checkpoint

YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, mscale=0.707,
            mscale_all_dim=0.707, beta_fast=32, beta_slow=1)

VARIANTS = {
    "v3": ("v3", {}),
    "v2": ("v2", {}),
    "v3-no-q-lora": ("v3", dict(q_lora_rank=None)),
    "v3-yarn": ("v3", dict(rope_scaling=YARN)),
    "v3-groups": ("v3", dict(n_routed_experts=16, n_group=4, topk_group=2)),
    "v2-group-limited": ("v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    "v3-rotate-half": ("v3", dict(rope_interleave=False)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    return make_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=3, **overrides)


def _prompts(n_vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, n_vocab, (n,), generator=g).tolist() for n in (5, 17, 9, 33)]


def test_logits_match_transformers(checkpoint):
    ref = load_reference(checkpoint)
    ours = load_model(checkpoint, progress=False)
    prompts = _prompts(ours.config.vocab_size)
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        for mode in ("auto", "naive", "absorbed"):
            logits = ours.compute_logits(ours(ids, pos, AttentionMetadata.build(lens, mode=mode)))
            start = 0
            for p in prompts:
                expect = ref(torch.tensor([p])).logits[0]
                got = logits[start:start + len(p)]
                assert (got - expect).abs().max().item() < 1e-4, mode
                start += len(p)


def test_greedy_generation_matches_transformers(checkpoint):
    ref = load_reference(checkpoint)
    ours = load_model(checkpoint, progress=False)
    prompts = _prompts(ours.config.vocab_size)
    eos = ours.config.eos_token_ids
    got = generate(ours, prompts, max_new_tokens=32, eos_token_ids=eos)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                               eos_token_id=eos, pad_token_id=0)
        assert g == out[0, len(p):].tolist()
