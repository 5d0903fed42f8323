"""Issue 18 (defects 4 and 5, endpoint features) through the official ``openai`` client against a real
server: every documented completions and chat field is honoured or refused with a 400 naming it
(structured output and top_logprobs included); unknown routes and methods answer in the OpenAI error
shape; /v1/models/{id}, /version, /tokenize and /detokenize. Shares the module's colocated server
(about 10 s to start)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.serve.helpers import (
    API_KEY,
    HEADERS,
    SCHEMA_FORMAT,
    check_top_logprobs,
    matches_schema,
    stream_chat,
)

PROMPT = [5, 6, 7, 8, 9]
GREEDY = dict(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
NO_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _ids(choice) -> list[int]:
    return choice.model_extra["token_ids"] if "token_ids" in (choice.model_extra or {}) else []


def _text(client, **kw) -> str:
    extra = {**NO_EOS, **kw.pop("extra_body", {})}
    return client.completions.create(**{**GREEDY, **kw}, extra_body=extra).choices[0].text


def _refused(call, param: str) -> str:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.body["param"] == param, e.value.body
    return e.value.body["message"]


# -- honoured ---------------------------------------------------------------------------------------

def test_n_choices_are_distinct_seeded_and_counted(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=3, extra_body=NO_EOS)
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # different samples
    assert r.usage.completion_tokens == 36 and r.usage.prompt_tokens == 5  # the prompt counted once
    assert [c.text for c in client.completions.create(**kw).choices] == texts  # reproducible
    assert client.completions.create(**{**kw, "n": 1}).choices[0].text == texts[0]  # choice 0 is the n=1 sample
    stream = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    joined = ["".join(c.choices[0].text for c in stream if c.choices and c.choices[0].index == i) for i in range(3)]
    assert joined == texts and stream[-1].usage.completion_tokens == 36
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, temperature=1, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]


def test_logit_bias_forces_a_token(client, server):
    r = client.completions.create(**GREEDY, logit_bias={"65": 100}, extra_body=NO_EOS)
    one = httpx.post(f"{server.url}/detokenize", json={"model": "tiny", "tokens": [65]}, headers=HEADERS)
    assert r.choices[0].text == one.json()["prompt"] * 24
    assert _text(client, logit_bias={"65": 100}) != _text(client)


def test_min_p_one_is_greedy(client):
    sampled = _text(client, temperature=1.0, seed=5, extra_body={"min_p": 1.0})
    assert sampled == _text(client)
    assert _text(client, temperature=1.0, seed=5) != sampled


@pytest.mark.parametrize("option", ["presence_penalty", "frequency_penalty", "repetition_penalty"])
def test_penalties_change_greedy_output(client, option):
    value = 1.8
    kw = {option: value} if option != "repetition_penalty" else {"extra_body": {option: value}}
    base, penalized = _text(client), _text(client, **kw)
    assert penalized != base
    assert len(set(penalized)) >= len(set(base))  # penalizing repeats does not narrow the tokens used


def test_echo_and_stream_usage(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0)
    assert r.choices[0].text == "abc" + plain.choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0, echo=True,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_guidellm_shaped_streams_get_running_usage(server, chat):
    """The bodies guidellm sends (stream_options with continuous_usage_stats, stop null, ignore_eos,
    chat content as a list of text parts, max_completion_tokens): accepted, and every chunk carries
    the usage so far, as vLLM does."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    if chat:
        body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
                "max_completion_tokens": 6, "stop": None, "ignore_eos": True}
    else:
        body = {"model": "tiny", "prompt": "hi there", "max_tokens": 6, "stop": None, "ignore_eos": True}
    url = f"{server.url}/v1/{'chat/completions' if chat else 'completions'}"
    with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": opts}, headers=HEADERS,
                      timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all("usage" in e for e in events)
    done = [e["usage"]["completion_tokens"] for e in events]
    assert done == sorted(done) and done[-1] == 6 and events[-1]["choices"] == []
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
               for e in events)


def test_no_effect_fields_are_accepted(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, user="u1", store=False,
                                       metadata={"k": "v"}, response_format={"type": "text"}, tools=[],
                                       parallel_tool_calls=True)
    assert r.choices[0].message.role == "assistant"
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2, best_of=1, user="u").choices


# -- refused by name --------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
CHAT_REFUSED = {
    "tools": dict(tools=[TOOL]),
    "tool_choice": dict(tool_choice="auto"),
    "top_logprobs": dict(top_logprobs=2),  # without logprobs
    "functions": dict(functions=[TOOL["function"]]),
    "audio": dict(audio={"voice": "alloy", "format": "wav"}),
    "prediction": dict(prediction={"type": "content", "content": "x"}),
    "reasoning_effort": dict(reasoning_effort="high"),
    "stream_options": dict(stream_options={"include_usage": True}),  # without stream
    "frobnicate": dict(extra_body={"frobnicate": 1}),
}
COMPLETION_REFUSED = {
    "suffix": dict(suffix="end"),
    "best_of": dict(best_of=3),
    "logprobs": dict(logprobs=6),
    "stream_options": dict(stream_options={"include_usage": True}),
    "guided_regex": dict(extra_body={"guided_regex": "(unclosed"}),
}


@pytest.mark.parametrize("param", CHAT_REFUSED)
def test_chat_field_refused_by_name(client, param):
    msg = _refused(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                                          **CHAT_REFUSED[param]), param)
    assert param in msg


@pytest.mark.parametrize("param", COMPLETION_REFUSED)
def test_completion_field_refused_by_name(client, param):
    msg = _refused(lambda: client.completions.create(model="tiny", prompt="a", max_tokens=2,
                                                     **COMPLETION_REFUSED[param]), param)
    assert param in msg


def test_logit_bias_outside_vocabulary(client):
    _refused(lambda: client.completions.create(model="tiny", prompt="a", max_tokens=2, logit_bias={"264": 1}),
             "logit_bias")


def test_over_long_prompt_refused_without_tokenizing_all(client, server):
    limit = 512
    t0 = time.monotonic()
    msg = _refused(lambda: client.completions.create(model="tiny", prompt="x" * (limit * 8 * 200), max_tokens=2),
                   "prompt")
    assert "first 4096 characters" in msg
    assert time.monotonic() - t0 < 10


# -- routes and endpoints ---------------------------------------------------------------------------

def test_routes_answer_in_openai_shape(server, client):
    r = httpx.get(f"{server.url}/v1/nope", headers=HEADERS)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "/v1/nope" in r.json()["error"]["message"]
    r = httpx.delete(f"{server.url}/v1/completions", headers=HEADERS)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("other")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_tokenize_round_trip(server):
    r = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "prompt": "hi"}, headers=HEADERS).json()
    assert r["count"] == 3 and r["tokens"][0] == 256  # BOS, then a token per byte
    bare = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "prompt": "hi", "add_special_tokens": False},
                      headers=HEADERS).json()
    assert bare["tokens"] == r["tokens"][1:]
    back = httpx.post(f"{server.url}/detokenize", json={"model": "tiny", "tokens": bare["tokens"]}, headers=HEADERS)
    assert back.json() == {"prompt": "hi"}
    chat = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "messages": MESSAGES}, headers=HEADERS).json()
    assert chat["count"] > 5
    assert httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "prompt": "hi"}).status_code == 401
    bad = httpx.post(f"{server.url}/detokenize", json={"model": "tiny", "tokens": [999]}, headers=HEADERS)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_n_choices_share_the_prompt_blocks(client, server):
    prompt = [(13 * i) % 200 + 3 for i in range(40)]  # two full blocks of 16, new to the cache
    before = server.metrics()["matrixinfer_prefix_cache_hit_tokens_total"]
    client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=1, n=3)
    assert server.metrics()["matrixinfer_prefix_cache_hit_tokens_total"] - before == 2 * 32



# -- structured output and top_logprobs ---------------------------------------------------------------

def _chat(client, **kw):
    return client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, **kw})


def test_json_schema_output_validates(client, server):
    """The untrained model's output is random, so only the grammar makes it valid: without it, the
    same request is not JSON. Streamed and not."""
    for seed in (0, 1):
        r = _chat(client, response_format=SCHEMA_FORMAT, temperature=1, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "stop" and matches_schema(r.choices[0].message.content), r
        assert not matches_schema(_chat(client, temperature=1, seed=seed, max_tokens=60).choices[0].message.content)
    _, text, reason, _ = stream_chat(server.url, {"model": "tiny", "messages": MESSAGES, "temperature": 1,
                                                  "seed": 7, "max_tokens": 200, "response_format": SCHEMA_FORMAT})
    assert reason == "stop" and matches_schema(text), text


def test_json_object_and_vllm_guided_fields(client):
    for seed in (0, 1):
        r = _chat(client, response_format={"type": "json_object"}, temperature=1, seed=seed, max_tokens=300)
        assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    choice = client.completions.create(model="tiny", prompt="a", max_tokens=8, temperature=1, seed=2,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no") and choice.choices[0].finish_reason == "stop"
    regex = client.completions.create(model="tiny", prompt="a", max_tokens=8, temperature=1, seed=2,
                                      extra_body={"guided_regex": "[ab]{3}"})
    assert len(regex.choices[0].text) == 3 and set(regex.choices[0].text) <= {"a", "b"}


def test_structured_output_cut_by_max_tokens_is_length(client, server):
    r = _chat(client, response_format=SCHEMA_FORMAT, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith('{"n')
    _, text, reason, _ = stream_chat(server.url, {"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                                                  "response_format": SCHEMA_FORMAT})
    assert reason == "length" and text == r.choices[0].message.content


def test_logit_bias_combines_with_response_format(client, server):
    a = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "prompt": "a", "add_special_tokens": False},
                   headers=HEADERS).json()["tokens"][0]
    r = _chat(client, response_format=SCHEMA_FORMAT, max_tokens=200, temperature=0, logit_bias={str(a): 100})
    assert json.loads(r.choices[0].message.content)["tag"] == "aaaaa"  # the bias wins wherever the schema allows


@pytest.mark.parametrize("fmt", [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
                                 {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
                                 {"type": "json_schema"}, {"type": "xml"}])
def test_bad_response_format_is_a_400(client, fmt):
    assert "response_format" in _refused(lambda: _chat(client, response_format=fmt, max_tokens=2), "response_format")


def test_top_logprobs_match_the_model(client, server, served_checkpoint):
    prompt = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "messages": MESSAGES},
                        headers=HEADERS).json()["tokens"]
    ids, _, _, entries = stream_chat(server.url, {"model": "tiny", "messages": MESSAGES, "max_tokens": 6,
                                                  "temperature": 0, "logprobs": True, "top_logprobs": 5})
    check_top_logprobs(served_checkpoint, prompt, ids, entries, 5)
    r = _chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=20)
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in entries], abs=1e-5)
    assert all(len(c.top_logprobs) == 20 and c.top_logprobs[0].logprob == c.logprob for c in content)
    legacy = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = legacy.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in entries], abs=1e-5)
    assert all(1 <= len(t) <= 4 and t[tok] == v for t, tok, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
