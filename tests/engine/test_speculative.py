"""MTP speculative decoding: greedy outputs identical to the plain engine (demo model, preemption,
stop strings, K = 1 and 2, the policy switching mid-run), sampling that keeps the target distribution
(chi-square at a fixed seed budget), the prefill -> decode handoff, and the pure policy."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from matrixinfer import kernels
from matrixinfer.config import EngineConfig, ModelConfig
from matrixinfer.engine import speculative
from matrixinfer.engine.block_manager import BlockManager
from matrixinfer.engine.errors import RequestError
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.outputs import EngineStats
from matrixinfer.engine.sampler import rejection_sample
from matrixinfer.engine.sampling_params import SamplingParams, StructuredOutput
from matrixinfer.engine.sequence import Sequence
from matrixinfer.engine.speculative import _pending_rows, last_hidden
from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.backend import select_backend
from matrixinfer.model.default_model import default_model_path
from matrixinfer.model.layers import RotaryEmbedding
from matrixinfer.model.loader import load_model
from matrixinfer.model.mla import MLA
from matrixinfer.model.tokenizer import Tokenizer
from matrixinfer.train.corpus import is_heldout, stdlib_root
from tests.checkpoints import tiny_config

BLOCK_BYTES = 5 * 16 * 80 * 4  # demo model: 4 layers + MTP, 16 tokens, 64 + 16 latent values, float32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests check outputs, not speed: one torch thread keeps them fast on a shared machine
    (several threads spinning on busy cores slow small steps tenfold)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the demo model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    path = default_model_path()
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    if not len(model.mtp):
        pytest.skip("the built-in model has no MTP module (no shipped demo model)")
    return path, model, Tokenizer(path)


def _heldout_text(limit: int = 6) -> str:
    root = stdlib_root()
    paths = sorted(p for p in root.glob("*.py") if is_heldout(p.name, 5))[:limit]
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)


def _engine(demo, connector: KVConnector | None = None, **kw) -> LLMEngine:
    path, model, tok = demo
    cfg = EngineConfig(model=str(path), device="cpu", dtype="float32", **kw)
    return LLMEngine(cfg, model=model, tokenizer=tok, connector=connector)


def _requests(tok: Tokenizer, n: int = 64) -> tuple[list[list[int]], list[SamplingParams]]:
    ids = tok.encode(_heldout_text(), add_special_tokens=False)
    rng = random.Random(7)
    prompts, params = [], []
    for i in range(n):
        length = rng.randint(8, 96)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(ids[start:start + length])
        kw: dict = dict(temperature=0.0, max_tokens=rng.randint(4, 40))
        if i % 4 == 1:
            kw["stop"] = ["\n\n", "):"]
        if i % 4 == 2:
            kw["stop"] = ["\n"]
            kw["min_tokens"] = 2
        if i % 8 == 3:
            kw["ignore_eos"] = True
        params.append(SamplingParams(**kw))
    return prompts, params


@pytest.fixture(scope="module")
def reference(demo):
    prompts, params = _requests(demo[2])
    eng = _engine(demo, kv_cache_memory=100 * BLOCK_BYTES, max_num_seqs=64)
    out = eng.generate(prompts, params)
    assert eng.preemptions > 0  # the cache holds a fraction of the batch: the runs below preempt too
    return prompts, params, out


@pytest.mark.parametrize("k, max_batch", [(1, 1024), (2, 16)])
def test_greedy_speculation_gives_the_plain_engines_outputs(demo, reference, k, max_batch):
    """64 mixed requests with preemption and stop strings; K = 2 speculates only once at most 16
    sequences decode, so sequences switch from plain steps to speculation mid-run."""
    prompts, params, expect = reference
    eng = _engine(demo, kv_cache_memory=100 * BLOCK_BYTES, max_num_seqs=64, speculative="mtp",
                  num_speculative_tokens=k, speculative_max_batch=max_batch)
    got = eng.generate(prompts, params)
    assert got == expect
    for out, p in zip(got, params):
        assert len(out) <= p.max_tokens
    st = eng.stats()
    assert eng.preemptions > 0 and eng.blocks.num_used == 0
    assert st.spec_draft_tokens > 0 and st.spec_verifications > 0
    # drafting works (a broken drafter would still give the same outputs, at acceptance near 0)
    assert st.spec_acceptance_rate > 0.4, st
    assert st.spec_tokens_per_step > 1.4, st
    assert st.generation_tokens == sum(len(o) for o in got)


def test_logprobs_with_speculation_are_the_plain_engines(demo):
    """Also the top_logprobs alternatives (issue 18), and a structured-output request is refused by
    name on a speculating engine."""
    prompts = _requests(demo[2], 4)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True, ignore_eos=True, top_logprobs=3)

    def run(**kw):
        eng = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, **kw)
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params)
        got: dict[str, tuple[list[int], list[float], list]] = {str(i): ([], [], []) for i in range(len(prompts))}
        while eng.has_work():
            for out in eng.step():
                got[out.request_id][0].extend(out.token_ids)
                got[out.request_id][1].extend(out.logprobs)
                got[out.request_id][2].extend(out.top_logprobs)
        return got, eng

    (plain, _), (spec, eng) = run(), run(speculative="mtp", num_speculative_tokens=2, speculative_max_batch=8)
    assert eng.spec is not None and eng.spec.accepted > 0
    for rid, (ids, lps, tops) in plain.items():
        assert spec[rid][0] == ids and len(spec[rid][1]) == len(ids) == 12
        assert spec[rid][1] == pytest.approx(lps, abs=1e-4)
        assert len(tops) == len(spec[rid][2]) == 12 and all(len(t) == 3 and t[0][0] == i for t, i in zip(tops, ids))
        assert [[t for t, _ in top] for top in spec[rid][2]] == [[t for t, _ in top] for top in tops]
        assert [v for top in spec[rid][2] for _, v in top] == pytest.approx([v for top in tops for _, v in top],
                                                                            abs=1e-4)


def test_structured_output_with_speculation_is_the_plain_engines(demo):
    """Issue 18: verification masks each draft row with the grammar after the drafts before it, so
    a speculating engine's greedy structured output is the plain engine's, and it follows the schema."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "size": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["name", "size"], "additionalProperties": False}
    prompts = _requests(demo[2], 3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=40,
                            structured=StructuredOutput(kind="json_schema", spec=json.dumps(schema)))

    def run(**kw):
        eng = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, **kw)
        return eng.generate(prompts, params), eng

    (plain, _), (spec, eng) = run(), run(speculative="mtp", num_speculative_tokens=2, speculative_max_batch=8)
    assert eng.spec is not None and eng.spec.drafted > 0
    assert spec == plain
    for ids in plain:
        obj = json.loads(demo[2].decode(ids))
        assert set(obj) == {"name", "size"} and len(obj["name"]) <= 12 and 0 <= obj["size"] <= 999


@pytest.mark.parametrize("where", ["verify", "advance"])
def test_a_request_whose_verification_raises_fails_alone(demo, monkeypatch, where):
    """An error verifying one request, or in its bookkeeping, fails that request only: its batch
    neighbours get the plain engine's outputs and every block is freed."""
    prompts = _requests(demo[2], 3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expect = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES).generate(prompts, [params] * 3)
    eng = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, speculative="mtp", num_speculative_tokens=1,
                  speculative_max_batch=8)
    assert eng.spec is not None
    obj = eng.sampler if where == "verify" else eng.spec
    if where == "verify":  # (a greedy batch verifies in the fused native step, which has no per-request failure)
        monkeypatch.setattr(speculative, "FUSED_STEP", False)
    real = getattr(obj, where)

    def flaky(*a, **kw):
        ids = a[1] if where == "verify" else [a[0].request_id]
        if "1" in ids and eng.spec.steps >= 3:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(obj, where, flaky)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(3)}
    errors = {}
    while eng.has_work():
        for out in eng.step():
            got[out.request_id].extend(out.token_ids)
            if out.error:
                errors[out.request_id] = out.error
    assert list(errors) == ["1"] and "boom" in errors["1"]
    assert got["0"] == expect[0] and got["2"] == expect[2]
    assert eng.blocks.num_used == 0 and eng.spec.verifications > 0


def test_one_call_draft_step_matches_the_per_operator_path(demo, monkeypatch):
    """The MTP draft step in one native call (MTPDraft, here with the float32 head and block) gives the
    per-operator path's hidden states and greedy drafts, over catch-up rows of several sequences."""
    monkeypatch.setattr(speculative, "INT8_DRAFT_HEAD", False)
    monkeypatch.setattr(speculative, "INT8_DRAFT_BLOCK", False)
    monkeypatch.setattr(speculative, "FUSED_STEP", False)
    eng = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, speculative="mtp", num_speculative_tokens=2,
                  speculative_max_batch=8)
    spec = eng.spec
    assert spec is not None
    monkeypatch.setattr(spec, "draft_ahead", lambda *a: None)  # keep the catch-up rows pending
    for i, p in enumerate(_requests(demo[2], 3)[0]):
        eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for _ in range(3):
        eng.step()
    rows = [(s, s.mtp_start, s.token_ids(s.mtp_start + 1, s.num_computed - s.mtp_start), _pending_rows(s))
            for s in eng.running]
    assert sum(len(r[2]) for r in rows) > len(rows)  # some sequences catch up more than one position
    fused_h, fused_t = spec._draft(rows)
    monkeypatch.setattr(spec, "_fused_draft", lambda: None)
    per_op_h, per_op_t = spec._draft(rows)
    assert fused_t is not None and per_op_t is None
    torch.testing.assert_close(fused_h, per_op_h, atol=1e-6, rtol=1e-6)
    assert fused_t == eng.runner.logits(per_op_h, mtp=True).argmax(-1).tolist()
    # a recursive depth (one position per sequence), its step inputs built again in the same buffers
    deeper = [(s, s.num_computed - 1, [t], per_op_h[j:j + 1]) for j, (s, t) in enumerate(zip(eng.running, fused_t))]
    monkeypatch.undo()
    monkeypatch.setattr(speculative, "INT8_DRAFT_HEAD", False)
    monkeypatch.setattr(speculative, "INT8_DRAFT_BLOCK", False)
    monkeypatch.setattr(speculative, "FUSED_STEP", False)
    deep_h, deep_t = spec._draft(deeper)
    per_op_h = eng.runner.mtp(deeper)
    torch.testing.assert_close(deep_h, per_op_h, atol=1e-6, rtol=1e-6)
    assert deep_t == eng.runner.logits(per_op_h, mtp=True).argmax(-1).tolist()


def _ahead_setup(demo, k: int, lengths: tuple[int, ...]):
    """Three greedy requests of ``lengths`` tokens, the plain engine's outputs for them, and an
    engine speculating ``k`` deep at every batch up to 8 (callers turn the fused greedy step off
    to see the separate draft-ahead call)."""
    prompts = _requests(demo[2], 3)[0]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    expect = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES).generate(prompts, params)
    eng = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, speculative="mtp", num_speculative_tokens=k,
                  speculative_max_batch=8)
    assert eng.spec is not None
    return prompts, params, expect, eng, eng.spec


def test_drafting_ahead_gives_the_next_steps_catch_up_drafts(demo, monkeypatch):
    """The verification step's draft-ahead (on the pass's own metadata: a prefix of its rows at
    batch 1, a gathered subset in a batch) gives the MTP states and first drafts that the next
    step's catch-up of the same rows gives, and the outputs stay the plain engine's."""
    monkeypatch.setattr(speculative, "FUSED_STEP", False)
    prompts, params, expect, eng, spec = _ahead_setup(demo, 1, (10, 16, 24))
    real, batches = spec._draft_ahead, []

    def both(verified, hidden, depth=1):
        rows = [(s, s.mtp_start, s.token_ids(s.mtp_start + 1, s.num_computed - s.mtp_start), _pending_rows(s))
                for s, _ in verified if not s.finished]
        caught_h, caught_t = spec._draft(rows)  # (rewrites the same MTP cache entries with the same values)
        real(verified, hidden, depth)
        assert caught_t is not None and [s.mtp_draft[0][0] for s, *_ in rows] == caught_t
        torch.testing.assert_close(torch.cat([s.mtp_draft[0][1] for s, *_ in rows]), caught_h, atol=1e-5,
                                   rtol=1e-5)
        batches.append(len(rows))

    monkeypatch.setattr(spec, "_draft_ahead", both)
    assert eng.generate(prompts, params) == expect
    assert 3 in batches and 1 in batches  # drafted ahead in a batch and alone


def test_drafting_ahead_two_deep_gives_the_recursive_drafts_in_one_call(demo, monkeypatch):
    """With two drafts, the draft-ahead's one call also drafts the second (one position on, from
    the first draft and its state): the token and state the next step's recursive draft gives,
    so that step runs no draft call of its own; outputs stay the plain engine's."""
    monkeypatch.setattr(speculative, "FUSED_STEP", False)
    prompts, params, expect, eng, spec = _ahead_setup(demo, 2, (12, 20, 40))
    real, real_propose, fused = spec._draft_ahead, spec.propose, spec._run_fused
    deep: list[str] = []
    per_propose: list[int] = []  # draft calls each propose made
    fused_calls = [0]

    def ahead(verified, hidden, depth=1):
        real(verified, hidden, depth)
        for s, _ in verified:
            if s.mtp_draft is not None and len(s.mtp_draft) == 2:
                (tok1, h1), (tok2, h2) = s.mtp_draft
                again_h, again_t = spec._draft([(s, s.num_computed, [tok1], h1)])  # propose's depth 2
                assert again_t == [tok2]
                torch.testing.assert_close(again_h, h2, atol=1e-5, rtol=1e-5)
                deep.append(s.request_id)

    def propose(chunks, look):
        before = fused_calls[0]
        out = real_propose(chunks, look)
        per_propose.append(fused_calls[0] - before)
        return out

    def counted(*a, **k):
        fused_calls[0] += 1
        return fused(*a, **k)

    monkeypatch.setattr(spec, "_draft_ahead", ahead)
    monkeypatch.setattr(spec, "propose", propose)
    monkeypatch.setattr(spec, "_run_fused", counted)
    assert eng.generate(prompts, params) == expect
    assert len(set(deep)) == 3  # every request drafted two deep ahead, in a batch and alone
    assert per_propose.count(0) > len(per_propose) // 2  # most steps' propose ran no draft call


@pytest.mark.parametrize("k", [1, 2])
def test_fused_greedy_step_gives_the_separate_calls_tokens_and_drafts(demo, monkeypatch, k):
    """A greedy batch's verification and next drafts in one native call (verify_fused) give, step by
    step, the tokens, acceptance and drafts (tokens and MTP states) of the separate verification
    and draft-ahead calls; with two drafts, a step whose second draft would fall in a block the
    rollback frees drafts one (as the separate path does)."""
    prompts, params, expect, fused_eng, fused_spec = _ahead_setup(demo, k, (14, 30, 47))
    sep_eng = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, speculative="mtp", num_speculative_tokens=k,
                      speculative_max_batch=8)
    real, calls = fused_spec.runner.speculate, []

    def spy(*a, **kw):
        found = real(*a, **kw)
        calls.append(found[-1] if found is not None else None)
        return found

    monkeypatch.setattr(fused_spec.runner, "speculate", spy)
    for eng in (fused_eng, sep_eng):
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params[i])
    got: dict[str, list[int]] = {str(i): [] for i in range(3)}
    while fused_eng.has_work():
        monkeypatch.setattr(speculative, "FUSED_STEP", True)
        outs = fused_eng.step()
        monkeypatch.setattr(speculative, "FUSED_STEP", False)
        assert [(o.request_id, o.token_ids) for o in sep_eng.step()] == [(o.request_id, o.token_ids) for o in outs]
        for o in outs:
            got[o.request_id].extend(o.token_ids)
        for a, b in zip(fused_eng.running, sep_eng.running):
            assert a.num_computed == b.num_computed and a.block_table == b.block_table
            assert (a.mtp_draft is None) == (b.mtp_draft is None)
            if a.mtp_draft is not None and b.mtp_draft is not None:
                assert [t for t, _ in a.mtp_draft] == [t for t, _ in b.mtp_draft]
                torch.testing.assert_close(torch.cat([h for _, h in a.mtp_draft]),
                                           torch.cat([h for _, h in b.mtp_draft]), atol=1e-5, rtol=1e-5)
    assert not sep_eng.has_work() and [got[str(i)] for i in range(3)] == expect
    assert (fused_eng.spec.drafted, fused_eng.spec.accepted) == (sep_eng.spec.drafted, sep_eng.spec.accepted)
    assert calls.count(k) > len(calls) // 2  # most steps verified in one call, drafting k deep
    if k == 2:
        assert 1 in calls  # a second draft past the blocks kept: one drafted


def test_blocks_of_accepted_drafts_are_named_for_the_prefix_cache(demo):
    """A speculated request's generated blocks are found by a later request that continues it
    (their names hash the tokens the drafts turned out to be, never a partial block)."""
    prompt = _requests(demo[2], 1)[0][0][:40]
    eng = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, speculative="mtp", num_speculative_tokens=2,
                  speculative_max_batch=8)
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))[0]
    assert eng.stats().spec_accepted_tokens > 10
    follow = prompt + out
    before = eng.blocks.hit_tokens
    eng.generate([follow], SamplingParams(temperature=0.0, max_tokens=1))
    # every full block of the first request's KV (all its tokens but the last were computed)
    assert eng.blocks.hit_tokens - before == (len(follow) - 1) // 16 * 16


def test_mtp_needs_a_checkpoint_with_an_mtp_module(tiny_v3):
    """transformers writes no MTP tensors: the model loads without its MTP module."""
    with pytest.raises(ValueError, match="MTP module"):
        LLMEngine(EngineConfig(model=str(tiny_v3), device="cpu", dtype="float32", kv_cache_memory=1 << 20,
                               speculative="mtp", speculative_max_batch=4), tokenizer=_Letters())


def test_speculative_settings_are_checked():
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative="mtp", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative must be"):
        EngineConfig(speculative="eagle")
    with pytest.raises(ValueError, match="speculative_max_batch"):
        EngineConfig(speculative="mtp", speculative_max_batch=-1)


# -- prefill -> decode handoff -------------------------------------------------------------------------
class Capture(KVConnector):
    """A prefill instance's handoff: the prompt's KV (every layer, the MTP layer included) and the
    last prompt position's hidden state."""

    def __init__(self) -> None:
        self.captured: dict = {}

    def take_over(self, seq, token, logprob):
        self.captured = {"kv": self.cache.read_tokens(seq.block_table, len(seq.prompt_ids)), "token": token,
                         "hidden": last_hidden(seq)}
        return True


def test_handoff_then_speculative_decode_matches_the_plain_engine(demo, reference):
    prompts, params, expect = reference
    i = max(range(len(prompts)), key=lambda j: params[j].max_tokens)
    prompt, p = prompts[i], params[i]
    capture = Capture()
    pre = _engine(demo, capture, kv_cache_memory=64 * BLOCK_BYTES, speculative="mtp", speculative_max_batch=8)
    dec = _engine(demo, kv_cache_memory=64 * BLOCK_BYTES, speculative="mtp", speculative_max_batch=8)
    pre.add_request("x", prompt, p)
    while not capture.captured:
        pre.step()
    assert len(capture.captured["hidden"]) == demo[1].config.hidden_size * 4
    assert dec.reserve("x", len(prompt), timeout=10) is not None
    assert dec.write_reserved("x", 0, capture.captured["kv"])
    first = dec.attach("x", prompt, capture.captured["token"], None, p, hidden=capture.captured["hidden"])
    got = list(first.token_ids)
    while dec.has_work():
        for out in dec.step():
            got.extend(out.token_ids)
    assert got == expect[i]
    st = dec.stats()
    assert st.spec_draft_tokens > 0 and st.spec_acceptance_rate > 0.3  # the first draft came from the handoff
    assert dec.reserve("y", 4, timeout=10) is not None
    with pytest.raises(RequestError, match="hidden state has 12 bytes"):
        dec.attach("y", prompt[:4], 5, None, p, hidden=b"\0" * 12)


# -- sampling keeps the target distribution -------------------------------------------------------------
def _chi2_pvalue(stat: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _chi2(counts: dict[int, int], probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs``; tokens expected fewer than 5 times share a bin."""
    n = sum(counts.values())
    expected = (probs.double() * n).tolist()
    order = sorted(range(len(expected)), key=lambda t: expected[t])
    bins: list[tuple[float, int]] = []
    acc_e, acc_c = 0.0, 0
    for t in order:
        acc_e += expected[t]
        acc_c += counts.get(t, 0)
        if acc_e >= 5:
            bins.append((acc_e, acc_c))
            acc_e, acc_c = 0.0, 0
    if acc_e > 0 and bins:
        e, c = bins.pop()
        bins.append((e + acc_e, c + acc_c))
    stat = sum((c - e) ** 2 / e for e, c in bins)
    return stat, len(bins) - 1


def _conditional_test(samples: list[tuple[int, ...]], truth, min_count: int = 40) -> tuple[float, int, int]:
    """Sum of chi-square statistics of each position's token given every prefix seen at least
    ``min_count`` times, against ``truth(prefix)`` (the target's next-token distribution)."""
    stat, dof, tests = 0.0, 0, 0
    for j in range(max(len(s) for s in samples)):
        groups: dict[tuple[int, ...], dict[int, int]] = {}
        for s in samples:
            if len(s) > j:
                c = groups.setdefault(s[:j], {})
                c[s[j]] = c.get(s[j], 0) + 1
        for prefix, counts in groups.items():
            if sum(counts.values()) >= min_count:
                s_, d_ = _chi2(counts, truth(prefix))
                stat, dof, tests = stat + s_, dof + d_, tests + 1
    return stat, dof, tests


def test_rejection_sampling_keeps_the_target_distribution_and_the_test_catches_a_wrong_one():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 8, generator=g) * 1.5, dim=-1)
    drafts = [int(probs[0].argsort()[-2]), int(probs[1].argmax())]  # a likely and the most likely token

    def truth(prefix):
        return probs[len(prefix)] if list(prefix) == drafts[:len(prefix)] else None

    def run(sampler) -> list[tuple[int, ...]]:
        gen = torch.Generator().manual_seed(1)
        return [tuple(sampler(probs, drafts, gen)) for _ in range(6000)]

    good = run(rejection_sample)
    stat, dof, tests = _conditional_test(good, truth)
    assert tests == 3 and _chi2_pvalue(stat, dof) > 1e-3

    def resample_from_p(probs, drafts, gen):  # a common bug: after a rejection, draw from p, not the residual
        u = torch.rand(len(drafts), generator=gen)
        out = []
        for j, d in enumerate(drafts):
            if u[j] < probs[j, d]:
                out.append(d)
            else:
                return out + [int(torch.multinomial(probs[j], 1, generator=gen)[0])]
        return out + [int(torch.multinomial(probs[-1], 1, generator=gen)[0])]

    stat, dof, _ = _conditional_test(run(resample_from_p), truth)
    assert _chi2_pvalue(stat, dof) < 1e-6


class _Letters:
    """A tokenizer for a 12-token vocabulary (a letter per id)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)


def _tiny_mtp_model():
    from matrixinfer.train.loop import build_model

    cfg = ModelConfig.from_dict(dict(
        architectures=["DeepseekV3ForCausalLM"], vocab_size=12, hidden_size=32, intermediate_size=48,
        moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1, num_nextn_predict_layers=1,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=1))
    model = build_model(cfg, seed=3).eval()
    with torch.no_grad():  # a peaked but not degenerate next-token distribution (the MTP head is tied to it)
        model.lm_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    select_backend(model)  # the native kernels, as a loaded model runs
    return model


def test_speculative_sampling_matches_the_models_distribution(tmp_path):
    """3000 seeded samples of 4 tokens through the engine with K = 2, against the model's own
    next-token distributions (cache-free forward passes): summed chi-square over every prefix seen
    40 times or more."""
    model = _tiny_mtp_model()
    cfg = EngineConfig(device="cpu", dtype="float32", kv_cache_memory=4 << 20, max_num_seqs=256,
                       max_num_batched_tokens=2048, speculative="mtp", num_speculative_tokens=2,
                       speculative_max_batch=1024, enable_prefix_caching=False)
    eng = LLMEngine(cfg, model=model, tokenizer=_Letters())
    prompt = [0, 5, 7, 3, 9]
    n = 3000
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=i, ignore_eos=True) for i in range(n)]
    samples = [tuple(o) for o in eng.generate([prompt] * n, params)]
    st = eng.stats()
    assert st.spec_accepted_tokens > 300 and st.spec_draft_tokens - st.spec_accepted_tokens > 300, st

    @torch.no_grad()
    def truth(prefix):
        ids = prompt + list(prefix)
        h = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.build([len(ids)]))
        return model.compute_logits(h[-1:])[0].softmax(-1)

    stat, dof, tests = _conditional_test(samples, truth)
    assert tests >= 20 and dof >= 100
    assert _chi2_pvalue(stat, dof) > 1e-3, (stat, dof)


def test_step_costs_are_measured_at_start_up_and_the_policy_decides(tmp_path):
    """Without --speculative-max-batch the engine times plain and speculative steps at start-up
    over free blocks (leaving them free) and speculates per step from those costs."""
    model = _tiny_mtp_model()
    base = dict(device="cpu", dtype="float32", kv_cache_memory=1 << 20, max_num_seqs=8)
    eng = LLMEngine(EngineConfig(**base, speculative="mtp", num_speculative_tokens=2), model=model,
                    tokenizer=_Letters())
    costs = eng.spec.policy.costs
    assert costs is not None and costs.batches[0] == 1 and len(costs.spec) == 2
    assert all(t > 0 for t in costs.plain) and eng.blocks.num_free == eng.blocks.num_blocks
    prompts = [[0, 5, 7, 3, 9], [2, 4, 6], [8, 8, 8, 8, 8, 8, 8]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = LLMEngine(EngineConfig(**base), model=model, tokenizer=_Letters()).generate(prompts, params)
    fed = []
    observe_step = eng.spec.observe_step
    eng.spec.observe_step = lambda timed, t: fed.append((timed, t)) or observe_step(timed, t)
    assert eng.generate(prompts, params) == plain
    # the engine timed every step after the prompts' one (all decode-only), at its batch (3, or
    # fewer once a sequence that drafted well is done) and depth; the policy learned from those
    # at the depth of the step before
    timed = [(b, d) for (b, d), t in fed[1:] if t > 0]
    assert fed[0][0] is None and len(timed) == eng.steps - 1 > 0 and all(b <= 3 and 0 <= d <= 2 for b, d in timed)
    learned = eng.spec.policy.learned
    same = sum(1 for (_, d0), (_, d1) in zip(timed, timed[1:]) if d0 == d1)
    assert sum(learned.measured(b, d) for b in (1, 3) for d in range(3)) == same > 0
    assert learned.at(3) != pytest.approx([costs.at(3)[0], *costs.at(3)[1]])


def test_a_batch_wider_than_any_that_may_speculate_skips_the_policy(monkeypatch):
    """Past the policy's limit (here --speculative-max-batch 2) a step asks the policy nothing and
    keeps no decode row's hidden state; drafting resumes when the batch shrinks (one plain step
    later), and the outputs are the plain engine's."""
    model = _tiny_mtp_model()
    base = dict(device="cpu", dtype="float32", kv_cache_memory=1 << 20, max_num_seqs=8)
    eng = LLMEngine(EngineConfig(**base, speculative="mtp", num_speculative_tokens=2, speculative_max_batch=2),
                    model=model, tokenizer=_Letters())
    decisions = []
    decide = eng.spec.policy.decide
    monkeypatch.setattr(eng.spec.policy, "decide", lambda b: decisions.append(b) or decide(b))
    kept_past = []
    keep_plain = eng.spec.keep_plain

    def spy(chunks, hidden):
        keep_plain(chunks, hidden)
        if eng.spec.past_limit:
            kept_past.extend(s.mtp_count for s, n in chunks if s.num_computed >= len(s.prompt_ids))
    monkeypatch.setattr(eng.spec, "keep_plain", spy)
    prompts = [[0, 5, 7, 3, 9], [2, 4, 6], [8, 8, 8, 8, 8, 8, 8]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (4, 12, 12)]
    plain = LLMEngine(EngineConfig(**base), model=model, tokenizer=_Letters()).generate(prompts, params)
    assert eng.generate(prompts, params) == plain
    assert decisions and set(decisions) == {2} and eng.spec.steps > 0  # asked (and drafting) only at 2
    assert kept_past and set(kept_past) == {0}  # decode rows of 3-sequence steps kept nothing


# -- pieces ---------------------------------------------------------------------------------------------
def test_truncate_returns_the_blocks_of_rejected_drafts():
    bm = BlockManager(8, 4)
    seq = Sequence("s", list(range(6)), SamplingParams())
    bm.reserve(seq, 6 + 3)  # 6 tokens and 3 drafts: 3 blocks
    assert len(seq.block_table) == 3 and bm.num_free == 5
    bm.truncate(seq, 8)  # 2 drafts rejected: 8 tokens still fit 2 blocks
    assert len(seq.block_table) == 2 and bm.num_free == 6
    bm.free(seq)
    assert bm.num_free == 8


def test_speculation_metrics_are_exported():
    from prometheus_client import generate_latest

    from matrixinfer.serve.metrics import ServerMetrics

    stats = EngineStats(spec_steps=10, spec_verifications=40, spec_draft_tokens=40, spec_accepted_tokens=26)
    assert stats.spec_acceptance_rate == pytest.approx(0.65) and stats.spec_tokens_per_step == pytest.approx(1.65)
    text = generate_latest(ServerMetrics(lambda: stats, lambda: [], "m").registry).decode()
    for line in ("matrixinfer_spec_decode_draft_tokens_total 40.0",
                 "matrixinfer_spec_decode_accepted_tokens_total 26.0",
                 "matrixinfer_spec_decode_acceptance_rate 0.65", "matrixinfer_spec_decode_tokens_per_step 1.65"):
        name, value = line.split()
        assert f'{name}{{model_name="m"}} {value}' in text


def test_pd_with_speculation_matches_the_colocated_engine_without(demo, reference):
    """Router + a prefill and a decode instance as processes, both with --speculative mtp: the
    prefill instance hands over the KV (MTP layer included) and the last hidden state, the decode
    instance drafts and verifies; the streamed greedy tokens equal a plain colocated engine's."""
    import asyncio

    import httpx

    from tests.serve.helpers import API_KEY, Server, stream_tokens

    prompts, params, expect = reference
    chosen = sorted(range(len(prompts)), key=lambda j: -params[j].max_tokens)[:6]
    srv = Server(demo[0], "--num-prefill", "1", "--num-decode", "1", "--num-ems", "0",
                 "--kv-cache-memory", str(256 * BLOCK_BYTES), "--speculative", "mtp",
                 "--speculative-max-batch", "8", api_key=API_KEY)
    try:
        async def go():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[stream_tokens(client, srv.url, {
                    "model": "tiny", "prompt": prompts[j], "max_tokens": params[j].max_tokens, "temperature": 0,
                    "stop": params[j].stop, "min_tokens": params[j].min_tokens,
                    "ignore_eos": params[j].ignore_eos}) for j in chosen])

        got = [ids for ids, _ in asyncio.run(go())]
        assert got == [expect[j] for j in chosen]
        # counters arrive with the decode instance's load reports (every 0.2 s): the first one with
        # drafts may be from mid-run (once: drafts counted, none accepted yet), so wait for the
        # report that holds the whole run
        deadline = time.time() + 5
        while time.time() < deadline:
            m = srv.metrics()
            if m.get("matrixinfer_spec_decode_draft_tokens_total", 0) > 0 and \
                    m.get("matrixinfer_spec_decode_acceptance_rate", 0) > 0.3:
                break
            time.sleep(0.1)
        assert m["matrixinfer_spec_decode_draft_tokens_total"] > 0
        assert m["matrixinfer_spec_decode_acceptance_rate"] > 0.3
    finally:
        srv.stop()


def test_pending_hidden_states_are_capped_oldest_first():
    from matrixinfer.engine.speculative import PENDING_CAP, keep, reset

    seq = Sequence("s", [1, 2, 3], SamplingParams())
    seq.num_computed = 3
    reset(seq, 2)  # position 2 has no MTP entry yet
    step = torch.arange(4.0).view(4, 1).expand(4, 8).contiguous()
    keep(seq, step, 1, 2)
    assert (seq.mtp_start, seq.mtp_count) == (2, 1)
    for _ in range(PENDING_CAP + 5):  # plain steps: one row each
        seq.num_computed += 1
        keep(seq, step, 3, 4)
    assert seq.mtp_count == PENDING_CAP and seq.mtp_start + seq.mtp_count == seq.num_computed
    assert last_hidden(seq) == step[3].numpy().tobytes()
    seq.num_computed += 1  # a row not kept: nothing consistent to hand over
    assert last_hidden(seq) == b""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_speculation_on_cuda_gives_the_plain_cuda_engines_greedy_tokens(demo):
    """float32 on the GPU (a bfloat16 near-tie could differ between query lengths 1 and K + 1); the
    policy decides from the step costs it measures on the GPU."""
    path, _, tok = demo
    prompts, params = _requests(tok, 16)

    def run(**kw) -> tuple[LLMEngine, list[list[int]]]:
        eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="float32", kv_cache_memory=64 << 20, **kw))
        return eng, eng.generate(prompts, params)

    _, expect = run()
    eng, got = run(speculative="mtp", num_speculative_tokens=2)
    assert got == expect
    assert eng.stats().spec_draft_tokens > 0 and eng.stats().spec_acceptance_rate > 0.4


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: the native kernels cannot be built")
def test_verification_of_v3_shaped_attention_runs_absorbed_and_matches_the_naive_form(monkeypatch):
    """DeepSeek-V3's attention shape (rank 512, rope 64, nope 128, v 128; tiny hidden size): a
    verification (query length K + 1 = 3) over a longer context runs in the fused absorbed kernels,
    as plain decode does, and equals the naive form; a fresh prompt chunk still runs naive."""
    cfg = ModelConfig.from_dict(tiny_config(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                            v_head_dim=128, num_attention_heads=2).to_dict())
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert not mla.absorbed_prefill and mla.absorbed_max_query == 85
    select_backend(mla, "cpu")
    rope = RotaryEmbedding(cfg)
    fused: list[int] = []
    real = kernels.paged_mla
    monkeypatch.setattr(kernels, "paged_mla", lambda *a, **k: fused.append(a[0].shape[0]) or real(*a, **k))
    tables = torch.tensor([[3, 0, 2, 1]])

    def run(mode: str) -> list[torch.Tensor]:
        cache = PagedLatentCache(1, 4, 16, cfg.kv_cache_dim)
        outs = []
        for q, c in ((40, 40), (3, 43)):
            torch.manual_seed(c)
            x = torch.randn(q, cfg.hidden_size)
            cos, sin = rope.cos_sin(torch.arange(c - q, c))
            with torch.no_grad():
                outs.append(mla(x, cos, sin, rope, AttentionMetadata.build([q], [c], tables, 16, mode=mode), cache))
        return outs

    auto = run("auto")
    assert fused == [3]  # the prompt chunk ran naive, the verification absorbed
    for a, b in zip(auto, run("naive")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
