"""Property-based fuzz of the HTTP API (issue 19's bar): hypothesis builds request bodies from the
shape of the completions and chat requests, every field drawn from valid values, wrong types, huge
and non-finite numbers, lone surrogates and random extra keys. No response may be a 5xx, every 4xx
carries the OpenAI error body, and the server is healthy and serves normally afterwards.

1,000 cases per endpoint (25 concurrent requests per hypothesis example) run against a backend
that samples every accepted request with the real :class:`Sampler` (what made torch raise before);
500 more go through the real engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matrixinfer.config import EngineConfig
from matrixinfer.engine.async_engine import AsyncEngine
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.outputs import FinishReason, RequestOutput
from matrixinfer.engine.sampler import Sampler
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.serve.api_server import create_app
from tests.serve.test_api_errors import AUTH, ScriptedBackend

ENDPOINTS = ["/v1/completions", "/v1/chat/completions"]
SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\ud83d"])
text = st.text(max_size=12) | SURROGATES
# wrong types and extreme values, drawn cheaply (a fixed menu) or generated
WEIRD = [None, True, False, 0, -1, 1.5, -1e-300, 1 << 63, 1 << 64, -(1 << 64), 10 ** 40, 10 ** 400, float("nan"),
         float("inf"), float("-inf"), "", "x", "\ud800", [], [1, "a"], [[1]], {}, {"a": 1}]
weird = st.sampled_from(WEIRD) | st.integers() | st.floats() | text


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly valid values, sometimes anything."""
    return st.one_of(valid, valid, weird)


NUMBERS = {
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-300, 5e-3, 100.0, 101.0, -1e-9]),
    "top_p": st.floats(0, 1) | st.sampled_from([1e-300, 5e-324, 0.0, 1.0000001]),
    "top_k": st.integers(-2, 300) | st.sampled_from([1 << 31, (1 << 63) - 1, 1 << 63, 1 << 64]),
    "seed": st.integers(-(1 << 64), 1 << 65),
    "max_tokens": st.integers(-1, 8) | st.sampled_from([1 << 62, 1 << 70]),
    "max_completion_tokens": st.integers(0, 8),
    "min_tokens": st.integers(-1, 8),
    "n": st.integers(0, 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.just(0),
}
COMMON = {
    **NUMBERS,
    "model": st.just("fake") | text,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | weird}),
    "stop": text | st.lists(text, max_size=20),
    "stop_token_ids": st.lists(st.integers(-1, 300) | st.sampled_from([True, 1 << 64, 1.5]), max_size=5),
    "ignore_eos": st.booleans(),
    "user": text,
}
COMPLETION = {
    **COMMON,
    "prompt": text | st.lists(st.integers(-1, 300) | st.sampled_from([1 << 64, True]), max_size=6)
    | st.lists(text, max_size=2) | st.lists(st.lists(st.integers(0, 255), max_size=3), max_size=2),
    "logprobs": st.integers(-1, 2) | st.booleans(),
    "echo": st.booleans(),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"]) | weird},
    optional={"content": text | st.lists(st.fixed_dictionaries({"type": st.just("text") | text, "text": text}),
                                         max_size=2) | weird, "name": text})
CHAT = {**COMMON, "messages": st.lists(MESSAGE, max_size=3) | weird, "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 3)}


def bodies(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict[str, Any]]:
    required = {"model", "prompt", "messages"} & set(fields)
    return st.fixed_dictionaries({k: field(fields[k]) for k in required},
                                 optional={**{k: field(v) for k, v in fields.items() if k not in required},
                                           **{f"x{i}": weird for i in range(2)}})


def check(response_status: int, body: bytes, stream: bool) -> None:
    assert response_status < 500, body[:300]
    if response_status >= 400:
        err = json.loads(body)["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    elif stream:
        for line in body.decode().splitlines():
            if line.startswith("data: {"):
                assert "error" not in json.loads(line[6:]), line


class SamplingBackend(ScriptedBackend):
    """Accepts what the API accepts and samples each token with the real Sampler on random logits."""

    vocab_size = 256

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        sampler = Sampler()
        n = min(params.max_tokens, 3)
        produced: list[int] = []
        for i in range(1, n + 1):  # with each row's history, as the engine passes it (penalties need it)
            token = sampler(torch.randn(1, 256) * 20, [request_id], [params], [(prompt_ids, produced)])[0][0]
            produced.append(token)
            yield RequestOutput(request_id=request_id, token_ids=[token], logprobs=[-1.0] if params.logprobs else [],
                                text=chr(token), num_output_tokens=i, finished=i == n,
                                finish_reason=FinishReason.LENGTH if i == n else None)


def send_all(app: Any, path: str, raws: list[bytes], streams: list[bool]) -> None:
    """POST each body concurrently (in process, over ASGI) and check every response."""

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fuzz",
                                     headers={**AUTH, "Content-Type": "application/json"}) as c:
            responses = await asyncio.gather(*[c.post(path, content=raw) for raw in raws])
        for r, stream in zip(responses, streams):
            check(r.status_code, r.content, stream)

    asyncio.run(go())


def encoded(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()  # lone surrogates become \\u escapes, NaN a bare literal


@pytest.fixture(scope="module")
def sampling_app():
    return create_app(SamplingBackend([]), api_key="k-123")


BATCH = 25  # bodies per hypothesis example: 40 examples = 1,000 cases per endpoint
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(batch=st.lists(bodies(COMPLETION), min_size=BATCH, max_size=BATCH))
def test_fuzz_completions(sampling_app, batch):
    send_all(sampling_app, "/v1/completions", [encoded(b) for b in batch], [b.get("stream") is True for b in batch])


@FUZZ
@given(batch=st.lists(bodies(CHAT), min_size=BATCH, max_size=BATCH))
def test_fuzz_chat_completions(sampling_app, batch):
    send_all(sampling_app, "/v1/chat/completions", [encoded(b) for b in batch],
             [b.get("stream") is True for b in batch])


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(st.binary(max_size=64) | st.builds(lambda b, n: encoded(b)[:n], bodies(COMPLETION),
                                                         st.integers(0, 60)), min_size=BATCH, max_size=BATCH),
       path=st.sampled_from(ENDPOINTS))
def test_fuzz_raw_bytes(sampling_app, batch, path):
    send_all(sampling_app, path, batch, [False] * len(batch))


def test_the_server_is_healthy_after_the_fuzz(sampling_app):
    c = TestClient(sampling_app)
    assert c.get("/health").status_code == 200
    r = c.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 2


# -- through the real engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_app(served_checkpoint):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(served_checkpoint), served_model_name="fake",
                                                device="cpu", dtype="float32", kv_cache_memory=2 << 20,
                                                block_size=8)))
    yield create_app(engine, api_key="k-123"), engine
    engine.shutdown()


def _short(body: dict[str, Any]) -> dict[str, Any]:
    """Keep generations short: the fuzz is about accepting or refusing, not about long outputs."""
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and 0 < body[key] < 1 << 60:
            body[key] = min(body[key], 3)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2
    return body


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(bodies(COMPLETION).map(_short), min_size=BATCH, max_size=BATCH),
       chats=st.lists(bodies(CHAT).map(_short), min_size=BATCH, max_size=BATCH))
def test_fuzz_through_the_engine(engine_app, batch, chats):
    """500 cases through the real engine, 25 at a time (so they share its batches)."""
    app, _ = engine_app
    send_all(app, "/v1/completions", [encoded(b) for b in batch], [b.get("stream") is True for b in batch])
    send_all(app, "/v1/chat/completions", [encoded(b) for b in chats], [b.get("stream") is True for b in chats])


def test_the_engine_is_healthy_after_the_fuzz(engine_app):
    app, engine = engine_app
    client = TestClient(app)
    assert client.get("/health").status_code == 200 and engine.alive
    r = client.post("/v1/completions", json={"model": "fake", "prompt": [5, 6, 7], "max_tokens": 3,
                                             "temperature": 0, "ignore_eos": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert engine.engine.blocks.num_used == 0 and not engine.engine.has_work()
