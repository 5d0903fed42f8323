"""Malformed and oversized input gets a 4xx with the OpenAI error body, never a 500 (issue 19,
medium 6 and 8); tokenizing never blocks the event loop; a client that leaves while its request is
still queued aborts it (issue 19, 7)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from matrixinfer.engine.outputs import FinishReason, RequestOutput
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.serve.api_server import create_app
from tests.serve.test_api_errors import AUTH, ScriptedBackend, client, out

OK = [out("A", FinishReason.STOP)]
HEADERS = {**AUTH, "Content-Type": "application/json"}

MALFORMED = {
    "lone surrogate in prompt": b'{"model": "fake", "prompt": "a\\ud800b"}',
    "lone low surrogate in messages": b'{"model": "fake", "messages": [{"role": "user", "content": "\\udc00"}]}',
    "lone surrogate in model": b'{"model": "\\ud800", "prompt": "hi"}',
    "lone surrogate in stop": b'{"model": "fake", "prompt": "hi", "stop": ["\\ud83d"]}',
    "surrogate as raw UTF-8 bytes": b'{"model": "fake", "prompt": "\xed\xa0\x80"}',
    "invalid UTF-8": b'{"model": "fake", "prompt": "\xff\xfe"}',
    "nested 100k deep": b'{"model": "fake", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "an integer of 5,000 digits": b'{"model": "fake", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    "an integer beyond 64 bits": b'{"model": "fake", "prompt": "hi", "temperature": 18446744073709551616}',
    "a huge float": b'{"model": "fake", "prompt": "hi", "top_p": 1e400}',
    "NaN": b'{"model": "fake", "prompt": "hi", "temperature": NaN}',
    "token ids beyond 64 bits": b'{"model": "fake", "prompt": [1, 340282366920938463463374607431768211456]}',
    "seed beyond 64 bits": b'{"model": "fake", "prompt": "hi", "seed": 340282366920938463463374607431768211456}',
    "not an object": b'[1, 2, 3]',
    "empty": b"",
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_bodies_are_4xx_with_the_openai_body(name, path):
    r = client(OK).post(path, content=MALFORMED[name], headers=HEADERS)
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_a_lone_surrogate_is_named():
    r = client(OK).post("/v1/completions", content=MALFORMED["lone surrogate in prompt"], headers=HEADERS)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"Bearer k-123\xc3\xa9", b"\xe2\x82\xac", b"bearer"])
def test_non_ascii_authorization_is_a_401(value):
    r = client(OK).post("/v1/completions", json={"model": "fake", "prompt": "hi"}, headers={"Authorization": value})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_bodies_over_the_limit_are_413_with_or_without_a_length():
    from fastapi.testclient import TestClient

    c = TestClient(create_app(ScriptedBackend(OK), api_key=None, max_request_bytes=1024))
    body = json.dumps({"model": "fake", "prompt": "x" * 2000}).encode()
    r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for i in range(0, len(body), 100):
            yield body[i:i + 100]

    r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    small = {"model": "fake", "prompt": "x" * 10}
    assert c.post("/v1/completions", json=small).status_code == 200


class SlowTokenizer:
    """Tokenizing takes a second of blocking work (a multi-megabyte prompt)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(1.0)
        return list(text.encode())

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


def test_tokenizing_does_not_block_other_requests():
    backend = ScriptedBackend(OK)
    backend.tokenizer = SlowTokenizer()  # type: ignore[assignment]
    app = create_app(backend)

    async def go() -> tuple[int, float, int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            t0 = time.perf_counter()
            slow = asyncio.ensure_future(c.post("/v1/completions", json={"model": "fake", "prompt": "hi"}))
            await asyncio.sleep(0.1)  # the slow request is tokenizing now (or blocking the loop)
            health = await c.get("/health")
            waited = time.perf_counter() - t0
            return health.status_code, waited, (await slow).status_code

    health, waited, slow = asyncio.run(go())
    assert health == 200 and slow == 200
    assert waited < 0.6, f"/health answered {waited:.2f} s after a tokenization began"


class Forever(ScriptedBackend):
    """A request that never finishes: queued (no token at all) or running (one token, then none);
    records its abort."""

    aborted = False
    running = False

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        try:
            if self.running:
                yield out("A")
            await asyncio.Event().wait()
            yield out("never")
        finally:
            Forever.aborted = True


@pytest.mark.parametrize("running", [False, True], ids=["queued", "running"])
@pytest.mark.parametrize("api_key", [None, "k-123"])
def test_a_client_that_leaves_aborts_its_unstreamed_request(api_key, running):
    """(The API-key check used to be Starlette middleware, which hid the disconnect.)"""
    Forever.aborted = False
    backend = Forever([])
    backend.running = running
    app = create_app(backend, api_key=api_key)
    body = json.dumps({"model": "fake", "prompt": "hi"}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    start = time.monotonic()

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if time.monotonic() - start > 0.3:  # the client has left
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # nothing yet (servers answer a cancelled poll this way)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer k-123")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def go() -> None:
        await asyncio.wait_for(app(scope, receive, send), timeout=5)

    asyncio.run(go())
    assert Forever.aborted
