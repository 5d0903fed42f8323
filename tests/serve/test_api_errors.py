"""The API server's error paths and response shapes, in process over a scripted fake backend: each
exception maps to its status and OpenAI error body and is counted, and a stream that fails after it
started ends with an error event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from matrixinfer.engine.errors import EngineDeadError, RequestError
from matrixinfer.engine.outputs import EngineStats, FinishReason, RequestOutput
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.serve.api_server import create_app
from matrixinfer.serve.backend import Backend
from matrixinfer.serve.protocol import ApiError

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}

Step = RequestOutput | BaseException


class ByteTokenizer:
    """One token per byte."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return [t for m in messages for t in m["content"].encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


class ScriptedBackend:
    """Yields the scripted outputs and raises the scripted exceptions, in order."""

    model_id = "fake"
    max_model_len = 64
    max_seq_len = 64
    vocab_size = 256

    def __init__(self, script: list[Step]) -> None:
        self.script = script
        self.tokenizer = ByteTokenizer()
        self.problem: str | None = None
        self.stats = EngineStats()

    def health(self) -> str | None:
        return self.problem

    def instance_metrics(self) -> list[tuple[str, str, EngineStats]]:
        return []

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        for step in self.script:
            if isinstance(step, BaseException):
                raise step
            yield step


def out(text: str, finish: FinishReason | None = None, n: int = 1) -> RequestOutput:
    return RequestOutput(request_id="r", token_ids=list(text.encode()), logprobs=[-0.5] * len(text.encode()),
                         text=text, finished=finish is not None, finish_reason=finish, num_output_tokens=n)


def client(script: list[Step], api_key: str | None = KEY) -> TestClient:
    return TestClient(create_app(ScriptedBackend(script), api_key=api_key), raise_server_exceptions=False)


def errors_counted(c: TestClient) -> dict[str, float]:
    """``{status: count}`` of matrixinfer_request_errors."""
    families = text_string_to_metric_families(c.get("/metrics").text)
    return {s.labels["status"]: s.value for f in families if f.name == "matrixinfer_request_errors"
            for s in f.samples if s.name.endswith("_total")}


def events(body: str) -> list[str]:
    """The data payloads of a server-sent event stream."""
    return [e.removeprefix("data: ") for e in body.split("\n\n") if e]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


COMPLETION = {"model": "fake", "prompt": "hi", "max_tokens": 4}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_fake_backend_satisfies_the_protocol():
    assert isinstance(ScriptedBackend([]), Backend)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("script,status,expected", [
    ([RequestError("the prompt is empty")], 400, error_body("the prompt is empty", "invalid_request_error", "prompt")),
    ([RequestError("no grammar with speculation", param="response_format")], 400,  # an option the engine refuses
     error_body("no grammar with speculation", "invalid_request_error", "response_format")),
    ([EngineDeadError("engine failed: boom")], 503, error_body("engine failed: boom", "server_error")),
    ([ApiError(429, "slow down", code="rate_limited")], 429,
     error_body("slow down", "invalid_request_error", code="rate_limited")),
    ([], 500, error_body("the request ended without output", "server_error")),
])
def test_error_before_first_output_is_an_http_error(script, status, expected, stream):
    c = client(script)
    r = c.post("/v1/completions", json={**COMPLETION, "stream": stream}, headers=AUTH)
    assert r.status_code == status and r.json() == expected
    assert errors_counted(c) == {str(status): 1.0}


def test_error_after_first_output_unstreamed():
    c = client([out("A"), EngineDeadError("decode instance d0 died; the request was lost")])
    r = c.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert r.status_code == 503
    assert r.json() == error_body("decode instance d0 died; the request was lost", "server_error")
    assert errors_counted(c) == {"503": 1.0}


@pytest.mark.parametrize("exc,expected", [
    (EngineDeadError("engine failed: boom"), error_body("engine failed: boom", "server_error")),
    (ApiError(400, "bad", param="x"), error_body("bad", "invalid_request_error", "x")),
    (RequestError("no"), error_body("no", "invalid_request_error", "prompt")),
])
def test_error_after_streaming_started_ends_the_stream_with_an_error_event(exc, expected):
    c = client([out("A"), out("B"), exc])
    r = c.post("/v1/completions", json={**COMPLETION, "stream": True}, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = events(r.text)
    assert [json.loads(d)["choices"][0]["text"] for d in data[:2]] == ["A", "B"]
    assert json.loads(data[2]) == expected
    assert data[3:] == ["[DONE]"]
    status = exc.status if isinstance(exc, ApiError) else 503 if isinstance(exc, EngineDeadError) else 400
    assert errors_counted(c) == {str(status): 1.0}


def test_parse_errors_are_counted():
    c = client([out("A", FinishReason.LENGTH)])
    r = c.post("/v1/completions", content=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("invalid JSON body")
    r = c.post("/v1/completions", json={**COMPLETION, "model": "other"}, headers=AUTH)
    assert r.status_code == 404
    assert r.json() == error_body("the model 'other' does not exist; this server serves 'fake'",
                                  "invalid_request_error", "model", "model_not_found")
    r = c.post("/v1/completions", json={**COMPLETION, "max_tokens": 63}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"
    r = c.post("/v1/chat/completions", json={**CHAT, "temperature": -1}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert errors_counted(c) == {"400": 3.0, "404": 1.0}


def test_api_key():
    c = client([out("A", FinishReason.STOP)])
    r = c.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 401 and r.json() == error_body("missing API key", "invalid_request_error",
                                                           code="invalid_api_key")
    r = c.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "incorrect API key provided"
    assert c.get("/v1/no-such-route").status_code == 401  # the key is checked before routing
    assert c.get("/v1/models").status_code == 401
    assert c.get("/health").status_code == 200  # health and metrics stay open
    assert errors_counted(c) == {"401": 4.0}
    assert c.post("/v1/completions", json=COMPLETION, headers=AUTH).status_code == 200
    open_server = client([out("A", FinishReason.STOP)], api_key=None)
    assert open_server.post("/v1/completions", json=COMPLETION).status_code == 200


def test_health_reports_a_dead_backend():
    backend = ScriptedBackend([])
    c = TestClient(create_app(backend))
    assert c.get("/health").json() == {"status": "ok"}
    backend.problem = "engine is not running: RuntimeError('engine loop failed')"
    r = c.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "error", "error": backend.problem}


class Probe(BaseModel):
    n: int


def test_request_validation_errors_get_the_openai_body():
    app = create_app(ScriptedBackend([]), api_key=KEY)

    @app.post("/v1/probe")
    async def probe(body: Probe) -> Response:
        return JSONResponse({"n": body.n})

    c = TestClient(app)

    r = c.post("/v1/probe", json={"n": "many"}, headers=AUTH)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "n" and err["message"].startswith("n: ")
    assert errors_counted(c) == {"400": 1.0}


def test_unstreamed_bodies():
    c = client([out("A"), out("B", FinishReason.LENGTH, n=2)])
    r = c.post("/v1/completions", json={**COMPLETION, "logprobs": 1}, headers=AUTH)
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == "fake"
    assert body["choices"] == [{"index": 0, "text": "AB", "finish_reason": "length", "logprobs": {
        "tokens": ["A", "B"], "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"A": -0.5}, {"B": -0.5}], "text_offset": None}}]  # logprobs 1: the chosen token at least
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    r = client([out("A", FinishReason.STOP)]).post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "A"},
                                    "finish_reason": "stop", "logprobs": None}]
    metrics = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert [s.labels for s in metrics["matrixinfer_requests"].samples if s.name.endswith("_total")] == \
        [{"model_name": "fake", "finish_reason": "length"}]


def test_chat_stream_format():
    c = client([out("A"), out("", FinishReason.STOP, n=2)])
    r = c.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
               headers=AUTH)
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {ch["object"] for ch in chunks} == {"chat.completion.chunk"} and len({ch["id"] for ch in chunks}) == 1
    assert [ch["choices"] for ch in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "A"}, "finish_reason": None, "token_ids": [65]}],
        [{"index": 0, "delta": {}, "finish_reason": "stop", "token_ids": []}],
        [],
    ]
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_metrics_behind_the_key_only_when_asked():
    """Issue 19 (low): ``--protect-metrics`` puts /metrics behind --api-key; by default it stays open
    (as in vLLM) so that existing scrapers keep working. /health stays open either way."""
    open_app = TestClient(create_app(ScriptedBackend([]), api_key=KEY))
    assert open_app.get("/metrics").status_code == 200
    guarded = TestClient(create_app(ScriptedBackend([]), api_key=KEY, protect_metrics=True))
    r = guarded.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert guarded.get("/metrics", headers=AUTH).status_code == 200
    assert guarded.get("/health").status_code == 200
