"""Structured output and top log-probabilities in the sampler (issue 18), without a model: random
logits masked by llguidance grammars always give output that matches the grammar; a matcher built
afresh from the tokens so far (a P/D decode instance) allows exactly what the one that followed
along allows; alternatives are sorted and exact. CPU, under a second."""

from __future__ import annotations

import json

import msgspec
import pytest
import torch

from matrixinfer.engine.outputs import RequestOutput
from matrixinfer.engine.sampler import Sampler
from matrixinfer.engine.sampling_params import SamplingParams, StructuredOutput
from matrixinfer.engine.structured import GrammarError, Grammars, compile_grammar
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.model.tokenizer import Tokenizer
from matrixinfer.serve.messages import KVDone

VOCAB, EOS = 264, 257
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "colour": {"enum": ["red", "green"]},
                                           "tag": {"type": "string", "maxLength": 5}},
          "required": ["n", "colour", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bytetok")
    write_byte_tokenizer(path)
    return Tokenizer(path)


def _grammars(tok: Tokenizer) -> Grammars:
    return Grammars(tok.to_json, VOCAB, [EOS])


def _run(sampler: Sampler, so: StructuredOutput, seed: int, limit: int = 400) -> list[int]:
    """Sample from random logits under ``so`` until EOS (or ``limit`` tokens)."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0, seed=seed, structured=so, max_tokens=limit)
    out: list[int] = []
    while len(out) < limit:
        token = sampler(torch.randn(1, VOCAB, generator=g) * 3, [f"r{seed}"], [params], [([1], out)])[0][0]
        if token == EOS:
            sampler.forget(f"r{seed}")
            return out
        out.append(token)
    raise AssertionError(f"no EOS within {limit} tokens: {out}")


def test_random_logits_under_a_grammar_give_matching_output(tok):
    sampler = Sampler(_grammars(tok))
    schema = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA))
    for seed in range(4):
        obj = json.loads(tok.decode(_run(sampler, schema, seed)))
        assert set(obj) == {"n", "colour", "tag"} and isinstance(obj["n"], int)
        assert obj["colour"] in ("red", "green") and isinstance(obj["tag"], str) and len(obj["tag"]) <= 5
        assert tok.decode(_run(sampler, StructuredOutput(kind="choice", spec='["yes", "no"]'), seed)) in ("yes", "no")
        regex = tok.decode(_run(sampler, StructuredOutput(kind="regex", spec="[a-c]{2}-[0-9]{1,3}"), seed))
        head, tail = regex.split("-")
        assert len(head) == 2 and set(head) <= set("abc") and tail.isdigit() and 1 <= len(tail) <= 3, regex
    # the same random logits without a grammar are not JSON
    with pytest.raises(ValueError):
        json.loads(tok.decode(Sampler()(torch.randn(40, VOCAB, generator=torch.Generator().manual_seed(0)),
                                        ["x"] * 40, [SamplingParams(temperature=0)] * 40)[0]))


def test_matcher_rebuilt_from_the_tokens_allows_the_same(tok):
    so = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA))
    follower = _grammars(tok)
    ids = tok.encode('{"n": 12, "colour": "gr', add_special_tokens=False)
    for i in range(len(ids) + 1):
        mask = follower.allowed("a", so, ids[:i])
    fresh = _grammars(tok).allowed("b", so, ids)  # a decode instance: only the tokens so far
    assert torch.equal(mask, fresh)
    assert mask[tok.encode("e", add_special_tokens=False)[0]] and int(mask.sum()) == 1  # only "green" fits
    with pytest.raises(ValueError, match="left the grammar"):
        follower.allowed("a", so, ids + tok.encode("x", add_special_tokens=False))


def test_draft_masks_follow_the_drafts_and_leave_the_matcher_as_it_was(tok):
    so = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA))
    g, ids = _grammars(tok), tok.encode('{"n": 12, "colour": "', add_special_tokens=False)
    before = g.allowed("a", so, ids)
    good, bad = tok.encode("gr", add_special_tokens=False), tok.encode("x", add_special_tokens=False)
    masks = g.allowed_with_drafts("a", so, ids, good + bad + good)
    assert len(good) == 2 and len(masks) == 6 and torch.equal(masks[0], before)
    assert [torch.equal(masks[i], _grammars(tok).allowed("b", so, ids + good[:i])) for i in range(3)] == [True] * 3
    assert not masks[2][bad[0]] and all(torch.equal(m, masks[2]) for m in masks[3:])  # rejected at "x"
    assert torch.equal(g.allowed("a", so, ids), before)  # verification leaves the matcher after the output


def test_logit_bias_combines_with_the_grammar(tok):
    a = tok.encode("a", add_special_tokens=False)[0]
    so = StructuredOutput(kind="json_schema", spec=json.dumps(SCHEMA))
    params = SamplingParams(temperature=0, structured=so, logit_bias={a: 100.0})
    sampler, out = Sampler(_grammars(tok)), []
    g = torch.Generator().manual_seed(1)
    while (t := sampler(torch.randn(1, VOCAB, generator=g), ["r"], [params], [([1], out)])[0][0]) != EOS:
        out.append(t)
    assert json.loads(tok.decode(out))["tag"] == "aaaaa"  # the bias wins wherever the grammar allows it


@pytest.mark.parametrize("so", [StructuredOutput(kind="json_schema", spec='{"type": "objectx"}'),
                                StructuredOutput(kind="json_schema", spec="{not json"),
                                StructuredOutput(kind="regex", spec="(unclosed"),
                                StructuredOutput(kind="choice", spec="[]")])
def test_bad_grammars_are_named(so):
    with pytest.raises(GrammarError):
        compile_grammar(so)


def test_top_logprobs_are_sorted_and_exact():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0, logprobs=True, top_logprobs=k) for k in (5, 0, 20)]
    top: list[list[tuple[int, float]]] = []
    chosen, lps = Sampler()(logits, ["a", "b", "c"], params, None, top)
    ref = logits.log_softmax(-1)
    assert [len(t) for t in top] == [5, 0, 20]
    for i in (0, 2):
        ids = [t for t, _ in top[i]]
        assert ids[0] == chosen[i] and top[i][0][1] == pytest.approx(lps[i])
        assert ids == ref[i].argsort(descending=True)[:len(ids)].tolist()
        assert [v for _, v in top[i]] == pytest.approx(ref[i, ids].tolist(), abs=1e-6)


def test_new_fields_travel_on_the_wire():
    p = SamplingParams(logprobs=True, top_logprobs=3, structured=StructuredOutput(kind="regex", spec="a+"))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    out = RequestOutput(request_id="r", token_ids=[4], top_logprobs=[[(4, -0.1), (9, -2.5)]])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=RequestOutput) == out
    done = KVDone("r", 4, -0.1, 0, first_top_logprobs=[(4, -0.1)])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(done), type=KVDone) == done
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=StructuredOutput(kind="json_object"))


def test_first_token_alternatives_travel_with_an_ep_rank_handoff():
    """An EP prefill instance's rank other than 0 hands its request back to rank 0 (KVHandoff), which
    sends it on as KVDone: the first token's alternatives go along."""
    from matrixinfer.engine.sequence import Sequence
    from matrixinfer.parallel.dp_engine import HandoffCollector
    from matrixinfer.serve.kv_transfer import KVSender

    class Cache:
        def read_tokens(self, blocks, n):
            return torch.zeros(2, n, 4)

    col = HandoffCollector()
    col.bind(Cache(), Sampler())  # type: ignore[arg-type]
    col.wanted.add("r")
    seq = Sequence("r", [1, 2, 3], SamplingParams(logprobs=True, top_logprobs=2))
    seq.top_logprobs = [[(5, -0.1), (6, -2.5)]]
    assert col.take_over(seq, 5, -0.1)
    handoff = col.ready[0]
    assert handoff.first_top_logprobs == [(5, -0.1), (6, -2.5)]
    sent = []
    sender = KVSender(lambda rid, err: None)
    sender.pool.submit = lambda fn, dest, kv, done: sent.append(done)  # type: ignore[method-assign]
    sender.destinations["r"] = "127.0.0.1:1"
    sender.send_handoff(handoff)
    sender.close()
    assert sent[0].first_top_logprobs == [(5, -0.1), (6, -2.5)] and sent[0].first_token == 5
