"""The OpenAI API through the official ``openai`` client against a real server on loopback."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.helpers import API_KEY, HEADERS, wait_idle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion(client):
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=7, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 10 and 1 <= r.usage.completion_tokens <= 7
    again = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=7, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_completion_stream_matches_non_stream(client):
    full = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=9, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 9 == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=5, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_sampling_seed_and_logprobs(client):
    kw = dict(model="tiny", prompt="abc", max_tokens=8, temperature=1.0, top_p=0.9, seed=42, logprobs=1,
              extra_body={"top_k": 50, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    lps = a.choices[0].logprobs.token_logprobs
    assert len(lps) == 8 and all(lp <= 0 for lp in lps)


def test_stop_string(client):
    base = client.completions.create(model="tiny", prompt="xyz", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:5]
    if not stop.strip("\ufffd"):
        pytest.skip("greedy text has no printable stop candidate")
    r = client.completions.create(model="tiny", prompt="xyz", max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=17), "n"),
])
def test_bad_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", **{"max_tokens": 2, **kwargs})
    assert e.value.status_code == 400
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param


def test_empty_prompt(client):
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ""}])


def test_prompt_longer_than_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * 600, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"


def test_invalid_json(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                   headers={**HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "JSON" in r.json()["error"]["message"]


def test_api_key_required(server):
    for key in ("wrong-key",):
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 401 and "missing" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # health stays open


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "tiny", "prompt": [7] * 40, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    m = wait_idle(server, timeout=20)
    assert m["matrixinfer_requests_running"] == 0 and m["matrixinfer_kv_cache_blocks_used"] == 0
    assert m["matrixinfer_generation_tokens_total"] < 400 + 200  # it stopped long before 400 tokens
