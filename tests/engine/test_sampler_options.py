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
