"""One request can never take the engine down (issue 19, critical 1).

Sampling values that torch cannot take are refused (400) or made numerically safe before they reach
the engine; and should a request still make the engine raise, that request fails alone (HTTP 500
for it) while the engine goes on serving everyone else.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.async_engine import AsyncEngine
from matrixinfer.engine.errors import EngineDeadError, RequestFailedError
from matrixinfer.engine.llm_engine import MAX_FAILED_STEPS, LLMEngine
from matrixinfer.engine.sampler import Sampler
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.serve.protocol import ApiError, parse_chat, parse_completion
from tests.checkpoints import make_checkpoint

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 12]


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("top_k", 1 << 63), ("top_k", -2), ("seed", 1 << 64), ("seed", -(1 << 63) - 1), ("max_tokens", 1 << 63),
    ("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")), ("top_p", 0.0),
    ("stop_token_ids", [True]), ("stop_token_ids", [1 << 63]), ("stop_token_ids", list(range(2000))),
    ("top_k", 2.5), ("seed", True),
])
def test_values_torch_or_the_wire_cannot_take_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kw", [
    dict(temperature=1e-300), dict(temperature=5e-3), dict(temperature=100.0), dict(top_p=1e-300),
    dict(top_p=5e-324), dict(top_k=(1 << 63) - 1), dict(seed=(1 << 64) - 1), dict(seed=-(1 << 63)),
    dict(top_k=1, top_p=1e-300, temperature=1e-9, seed=0),
])
def test_accepted_extremes_sample_without_raising(kw):
    """What validation accepts, the sampler can take (before: torch raised on each of these)."""
    params = SamplingParams(max_tokens=4, **kw)
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * 30
    tokens, _ = Sampler()(logits, ["a", "b", "c"], [params] * 3)
    assert all(0 <= t < 300 for t in tokens)


def test_tiny_temperatures_are_greedy_or_vllms_floor():
    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(temperature=5e-3).temperature == 1e-2
    assert SamplingParams(top_p=1e-300).top_p == 1e-6


@pytest.mark.parametrize("body,param", [
    ({"top_k": 1 << 63}, "top_k"), ({"seed": 1 << 64}, "seed"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"temperature": 10 ** 400}, "temperature"), ({"max_tokens": 10 ** 30}, "max_tokens"),
    ({"top_p": -(10 ** 30)}, "top_p"), ({"n": 10 ** 30}, "n"), ({"presence_penalty": 10 ** 400}, "presence_penalty"),
])
def test_out_of_range_numbers_are_400s_naming_the_field(body, param):
    for parse, base in ((parse_completion, {"model": "m", "prompt": "hi"}),
                        (parse_chat, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})):
        with pytest.raises(ApiError) as err:
            parse({**base, **body})
        assert err.value.status == 400 and err.value.param == param


# -- isolation in the engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ck = make_checkpoint(tmp_path_factory.mktemp("iso"), "v3", seed=4, vocab_size=264, bos_token_id=256,
                         eos_token_id=257)
    write_byte_tokenizer(ck)
    return ck


@pytest.fixture
def engine(checkpoint):
    eng = AsyncEngine(LLMEngine(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32",
                                             kv_cache_memory=2 << 20, block_size=8)))
    yield eng
    eng.shutdown()


async def _run(engine: AsyncEngine, rid: str, params: SamplingParams) -> list[int] | BaseException:
    ids: list[int] = []
    try:
        async for out in engine.generate(rid, PROMPT, params):
            ids.extend(out.token_ids)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return ids


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("field,value", [("top_p", 1e-300), ("temperature", 1e-300), ("seed", 1 << 64),
                                         ("top_k", 1 << 63)])
def test_a_request_that_makes_torch_raise_fails_alone(engine, field, value):
    """The value is set after validation, as if validation had missed it: the request gets an error,
    its batch neighbour and every later request are served, and its blocks are freed."""
    alone = asyncio.run(_run(engine, "ref", _greedy()))
    bad = SamplingParams(max_tokens=6)
    setattr(bad, field, value)

    async def together():
        return await asyncio.gather(_run(engine, "good", _greedy()), _run(engine, "bad", bad))

    good, failed = asyncio.run(together())
    assert isinstance(failed, RequestFailedError) and "processing the request failed" in str(failed)
    assert good == alone and len(good) == 6
    assert engine.health() is None
    assert asyncio.run(_run(engine, "later", _greedy())) == alone
    assert engine.engine.blocks.num_used == 0 and not engine.engine.has_work()


def test_a_failed_forward_fails_its_batch_and_the_engine_goes_on(engine, monkeypatch):
    runner = engine.engine.runner
    real = runner.execute
    failures = iter([RuntimeError("device hiccup")])

    def flaky(chunks):
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return real(chunks)

    monkeypatch.setattr(runner, "execute", flaky)
    failed = asyncio.run(_run(engine, "a", _greedy()))
    assert isinstance(failed, RequestFailedError) and "device hiccup" in str(failed)
    assert engine.health() is None
    assert len(asyncio.run(_run(engine, "b", _greedy()))) == 6
    assert engine.engine.blocks.num_used == 0


def test_an_engine_that_fails_every_step_reports_itself_dead(engine, monkeypatch):
    def broken(chunks):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.engine.runner, "execute", broken)
    results = [asyncio.run(_run(engine, f"r{i}", _greedy())) for i in range(MAX_FAILED_STEPS)]
    assert all(isinstance(r, RequestFailedError) for r in results[:-1])
    assert isinstance(results[-1], EngineDeadError)
    assert engine.health() is not None and "device lost" in engine.health()
