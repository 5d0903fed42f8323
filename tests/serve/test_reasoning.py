"""Issue 18 feature: ``--reasoning-parser deepseek-r1`` splits ``<think>...</think>`` into
``reasoning_content``, streamed and not, through the official ``openai`` client: scripted answers
in process, then a real server on a tiny checkpoint whose chat template opens ``<think>`` as
DeepSeek-R1's does (about 10 s, most of it starting the server)."""

from __future__ import annotations

import json
import random

import openai
import pytest
from fastapi.testclient import TestClient

from matrixinfer.engine.outputs import FinishReason
from matrixinfer.model.default_model import write_byte_tokenizer
from matrixinfer.serve.api_server import create_app
from matrixinfer.serve.reasoning import ReasoningParser, split_reasoning
from tests.checkpoints import make_checkpoint
from tests.serve.helpers import API_KEY, Server
from tests.serve.test_api_errors import ScriptedBackend, out

CASES = {
    "<think>plan it</think>the answer": ("plan it", "the answer"),
    "plan it</think>the answer": ("plan it", "the answer"),  # the template opened <think>
    "still thinking <th": ("still thinking <th", None),  # cut off while thinking
    "<think>a</think>": ("a", None),
    "<think></think>b </think> c": ("", "b </think> c"),
    "<thin": ("<thin", None),
    "": ("", None),
}


@pytest.mark.parametrize("text", CASES)
def test_split_whole_and_in_every_chunking(text):
    assert split_reasoning(text) == CASES[text]
    rng = random.Random(0)
    for _ in range(30):
        p, reasoning, content = ReasoningParser(), "", ""
        i = 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            r, c = p.feed(text[i:j])
            reasoning, content, i = reasoning + r, content + c, j
        r, c = p.finish()
        assert (reasoning + r, (content + c) or None) == CASES[text]


def _client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, max_retries=0,
                         http_client=TestClient(app))


def test_official_client_reads_reasoning_content():
    script = [out("<th"), out("ink>I reason"), out(" here</th"), out("ink>The answer", FinishReason.STOP)]
    c = _client(create_app(ScriptedBackend(script), api_key=API_KEY, reasoning_parser="deepseek-r1"))
    msgs = [{"role": "user", "content": "q"}]
    r = c.chat.completions.create(model="fake", messages=msgs, max_tokens=8)
    assert r.choices[0].message.model_extra["reasoning_content"] == "I reason here"
    assert r.choices[0].message.content == "The answer"
    deltas = [ch.choices[0].delta for ch in c.chat.completions.create(model="fake", messages=msgs, max_tokens=8,
                                                                         stream=True) if ch.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "I reason here"
    assert "".join(d.content or "" for d in deltas) == "The answer"
    plain = _client(create_app(ScriptedBackend(script), api_key=API_KEY))  # no parser: the text as it came
    assert plain.chat.completions.create(model="fake", messages=msgs).choices[0].message.content == \
        "<think>I reason here</think>The answer"


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="deepseek-r1"):
        create_app(ScriptedBackend([]), reasoning_parser="other")


@pytest.fixture(scope="module")
def r1_server(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("r1"), "v3", seed=3, vocab_size=264, bos_token_id=256,
                           eos_token_id=257)
    write_byte_tokenizer(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("<|assistant|>{% endif %}", "<|assistant|><think>\n{% endif %}")
    assert "<think>" in cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    srv = Server(path, "--reasoning-parser", "deepseek-r1", api_key=API_KEY)
    yield srv
    srv.stop()


def test_r1_template_answer_is_reasoning_until_the_end_tag(r1_server):
    c = openai.OpenAI(base_url=f"{r1_server.url}/v1", api_key=API_KEY, max_retries=0)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "why?"}], max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    r = c.chat.completions.create(**kw)
    reasoning = r.choices[0].message.model_extra["reasoning_content"]
    assert len(reasoning) > 0 and r.choices[0].message.content is None  # no </think> yet: all reasoning
    chunks = [ch.choices[0].delta for ch in c.chat.completions.create(**kw, stream=True) if ch.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in chunks) == reasoning
    assert not any(d.content for d in chunks)


def test_chat_template_file_replaces_the_checkpoints(tmp_path, served_checkpoint):
    """``serve --chat-template FILE`` (create_app's ``chat_template``): the file's template renders chats."""
    from matrixinfer.model.tokenizer import Tokenizer

    class Backend(ScriptedBackend):
        pass

    backend = Backend([out("x", FinishReason.STOP)])
    backend.tokenizer = Tokenizer(served_checkpoint)
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    c = TestClient(create_app(backend, chat_template=str(f)))
    r = c.post("/tokenize", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert backend.tokenizer.decode(r.json()["tokens"]) == "[hi]"
    f.write_text("{% for %}")
    with pytest.raises(ValueError, match="chat template"):
        create_app(backend, chat_template=str(f))
    with pytest.raises(ValueError, match="chat-template"):
        create_app(backend, chat_template=str(tmp_path / "none.jinja"))
