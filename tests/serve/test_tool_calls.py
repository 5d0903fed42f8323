"""Issue 18 feature: ``--tool-call-parser deepseek``: ``tools`` and ``tool_choice`` (auto, required,
named) reach the chat template, and DeepSeek-V3/R1 tool-call markup in the answer comes back as
``tool_calls``, streamed and not, through the official ``openai`` client (scripted answers in
process; a real server renders the tools with a template that emits DeepSeek's markup)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from matrixinfer.engine.outputs import FinishReason
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.serve.api_server import create_app
from matrixinfer.serve.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, parse_tool_calls
from tests.checkpoints import make_checkpoint
from tests.serve.helpers import API_KEY, HEADERS, Server
from tests.serve.test_api_errors import ByteTokenizer, ScriptedBackend, out

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
MSGS = [{"role": "user", "content": "weather in Paris?"}]


def _call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


PARIS, NICE = _call("get_weather", '{"city": "Paris"}'), _call("get_weather", '{"city": "Nice"}')
ANSWER = "Let me check." + CALLS_BEGIN + PARIS + NICE + CALLS_END


def test_parse_markup():
    content, calls = parse_tool_calls(ANSWER)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Nice"})]
    assert parse_tool_calls("plain answer") == ("plain answer", [])
    cut = f"x{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"ci"
    assert parse_tool_calls(cut) == (cut, [])  # cut off: left as content, never lost
    named = "{\"city\": \"Rome\"}\n```" + CALL_END + CALLS_END  # the prompt opened the call
    prefix = f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n"
    content, calls = parse_tool_calls(named, prefix)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}


class ToolTokenizer(ByteTokenizer):
    def encode_chat(self, messages, tools=None, suffix=""):
        return super().encode_chat(messages) + [len(tools or [])] + list(suffix.encode()[:8])


def _client(script, parser="deepseek"):
    backend = ScriptedBackend(script)
    backend.tokenizer = ToolTokenizer()
    app = create_app(backend, api_key=API_KEY, tool_call_parser=parser)
    return openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, max_retries=0, http_client=TestClient(app))


def _script():
    cut = len("Let me check.") + 3  # the markup split across outputs
    return [out(ANSWER[:5]), out(ANSWER[5:cut]), out(ANSWER[cut:cut + 40]), out(ANSWER[cut + 40:], FinishReason.STOP)]


def test_official_client_reads_tool_calls():
    c = _client(_script())
    r = c.chat.completions.create(model="fake", messages=MSGS, tools=[TOOL])
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Let me check."
    assert [json.loads(t.function.arguments)["city"] for t in r.choices[0].message.tool_calls] == ["Paris", "Nice"]
    chunks = list(_client(_script()).chat.completions.create(model="fake", messages=MSGS, tools=[TOOL], stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather"), (1, "get_weather")]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # tool results go back in the conversation
    follow = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    plain = _client([out("It is sunny.", FinishReason.STOP)])
    r = plain.chat.completions.create(model="fake", messages=follow, tools=[TOOL])
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw,param", [(dict(tool_choice={"type": "function", "function": {"name": "nope"}}),
                                       "tool_choice"),
                                      (dict(tool_choice="required", tools=None), "tool_choice"),
                                      (dict(parallel_tool_calls=False), "parallel_tool_calls"),
                                      (dict(tools=[{"type": "function"}]), "tools")])
def test_bad_tool_requests(kw, param):
    args = {"tools": [TOOL], **kw}
    if args["tools"] is None:
        del args["tools"]
    with pytest.raises(openai.BadRequestError) as e:
        _client(_script()).chat.completions.create(model="fake", messages=MSGS, **args)
    assert e.value.body["param"] == param


def test_without_a_parser_tools_are_refused():
    with pytest.raises(openai.BadRequestError) as e:
        _client(_script(), parser=None).chat.completions.create(model="fake", messages=MSGS, tools=[TOOL])
    assert e.value.body["param"] == "tools"


TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'assistant' and m.get('tool_calls') %}<|assistant|>"
    "<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>function<｜tool▁sep｜>"
    "{{ c['function']['name'] }}\n```json\n{{ c['function']['arguments'] }}\n```<｜tool▁call▁end｜>{% endfor %}"
    "<｜tool▁calls▁end｜>\n{% else %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("tools"), "v3", seed=4, vocab_size=264, bos_token_id=256,
                           eos_token_id=257)
    write_byte_tokenizer(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    srv = Server(path, "--tool-call-parser", "deepseek", "--max-num-seqs", "4", api_key=API_KEY)
    yield srv
    srv.stop()


def test_real_server_renders_tools_and_forces_a_named_call(tool_server):
    """About 10 s (a server start). The random tiny model never closes a call, so the answer's call
    stays content; what is checked is the prompt the template rendered and the forced opening."""
    def prompt_text(**kw) -> str:
        body = {"model": "tiny", "messages": MSGS, **kw}
        ids = httpx.post(f"{tool_server.url}/tokenize", json=body, headers=HEADERS).json()["tokens"]
        return httpx.post(f"{tool_server.url}/detokenize", json={"model": "tiny", "tokens": ids},
                          headers=HEADERS).json()["prompt"]

    assert "tools:" not in prompt_text()
    c = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key=API_KEY, max_retries=0)
    kw = dict(model="tiny", messages=MSGS, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    free = c.chat.completions.create(**kw, tools=[TOOL])
    named = c.chat.completions.create(**kw, tools=[TOOL],
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert free.usage.prompt_tokens > c.chat.completions.create(**kw).usage.prompt_tokens  # tools rendered
    opening = f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n"
    assert named.usage.prompt_tokens == free.usage.prompt_tokens + len(opening.encode())  # the call opened
    assert named.choices[0].message.tool_calls is None  # never closed by this model: no call invented
