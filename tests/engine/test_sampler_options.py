"""Logit processing in the sampler (issue 18, defect 4): logit bias, presence/frequency/repetition
penalties and min-p change what is picked, for greedy and sampled rows alike."""

from __future__ import annotations

import msgspec
import pytest
import torch

from matrixinfer.engine.sampler import Sampler, process_logits
from matrixinfer.engine.sampling_params import SamplingParams


def _logits() -> torch.Tensor:
    return torch.tensor([[4.0, 3.0, 2.0, -1.0, 0.0]])


def test_logit_bias_changes_the_greedy_pick():
    s = Sampler()
    assert s(_logits(), ["a"], [SamplingParams(temperature=0)])[0] == [0]
    assert s(_logits(), ["a"], [SamplingParams(temperature=0, logit_bias={0: -100})])[0] == [1]
    assert s(_logits(), ["a"], [SamplingParams(temperature=0, logit_bias={4: 5.0})])[0] == [4]


def test_penalties_follow_vllm_semantics():
    hist = [([2, 3], [0, 0, 1])]  # prompt, output
    rep = process_logits(_logits(), [SamplingParams(repetition_penalty=2.0)], hist)[0].tolist()
    assert rep == [2.0, 1.5, 1.0, -2.0, 0.0]  # prompt and output tokens; positive divided, negative multiplied
    freq = process_logits(_logits(), [SamplingParams(frequency_penalty=1.0)], hist)[0].tolist()
    assert freq == [2.0, 2.0, 2.0, -1.0, 0.0]  # output counts only
    pres = process_logits(_logits(), [SamplingParams(presence_penalty=1.5)], hist)[0].tolist()
    assert pres == [2.5, 1.5, 2.0, -1.0, 0.0]
    # greedy: a strong frequency penalty moves the pick away from the repeated token
    assert Sampler()(_logits(), ["a"], [SamplingParams(temperature=0, frequency_penalty=2.0)], hist)[0] == [2]


def test_penalties_without_history_are_an_error_not_ignored():
    with pytest.raises(ValueError, match="histories"):
        process_logits(_logits(), [SamplingParams(presence_penalty=1.0)], None)


def test_min_p_drops_unlikely_tokens():
    s = Sampler()
    p = SamplingParams(temperature=1.0, min_p=0.3, seed=1)  # e^3/e^4 = 0.37 kept, e^2/e^4 = 0.14 dropped
    picks = {s(_logits(), [f"r{i}"], [msgspec.structs.replace(p, seed=i)])[0][0] for i in range(200)}
    assert picks == {0, 1}
    free = {s(_logits(), [f"f{i}"], [SamplingParams(temperature=1.0, seed=i)])[0][0] for i in range(200)}
    assert 2 in free


@pytest.mark.parametrize("bad", [{"min_p": 1.5}, {"presence_penalty": 3}, {"frequency_penalty": float("nan")},
                                 {"repetition_penalty": 0}, {"logit_bias": {1: 101}}, {"logit_bias": {-1: 1}}])
def test_out_of_range_options_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_new_fields_travel_on_the_wire():
    p = SamplingParams(min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                       logit_bias={7: -3.0})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p


def test_unseeded_rows_are_drawn_from_their_distribution_in_one_batch_and_seeded_rows_repeat():
    """Unseeded rows share one batched draw (argmax of p / Exp(1) noise); each row's tokens still
    follow its own distribution (chi-square at a fixed seed), and a seeded row is reproducible."""
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]])
    logits = probs.log().repeat(200, 1)  # 400 rows: two distributions, interleaved
    sampler, params = Sampler(), [SamplingParams(max_tokens=1, temperature=1.0)] * 400
    counts = torch.zeros(2, 4)
    for _ in range(10):  # 2,000 draws per distribution
        tokens, _ = sampler(logits, [str(i) for i in range(400)], params)
        for i, t in enumerate(tokens):
            counts[i % 2, t] += 1
    expected = probs * counts.sum(dim=1, keepdim=True)
    chi2 = ((counts - expected) ** 2 / expected).sum(dim=1)
    assert (chi2 < 16.27).all(), (counts, chi2)  # 3 degrees of freedom, p = 0.001
    seeded = [SamplingParams(max_tokens=1, temperature=1.0, seed=7)]
    draws = [Sampler()(logits[:1], ["s"], seeded)[0] for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
