"""Parsing and validating OpenAI-style request bodies into typed requests (pure, no I/O).

Every problem becomes an :class:`ApiError` carrying the HTTP status and the OpenAI error fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from matrixinfer.engine.sampling_params import (
    INT64_MIN,
    MAX_TOP_LOGPROBS,
    UINT64_MAX,
    SamplingParams,
    StructuredOutput,
    shown,
)
from matrixinfer.engine.structured import GrammarError, compile_grammar


class ApiError(Exception):
    """An error response: HTTP ``status`` plus OpenAI's ``{"error": {...}}`` fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerateRequest:
    """A parsed completions or chat request, ready for tokenization and the engine."""

    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None  # chat with a tool-call parser: the functions offered
    tool_choice: Any = None  # "auto", "required" or {"type": "function", "function": {"name": ...}}
    max_tokens_given: bool = False
    n: int = 1  # choices per request (each a request of its own to the engine, seeded seed + index)
    echo: bool = False  # completions: the prompt text precedes each choice's text
    continuous_usage: bool = False  # streaming: the running usage on every chunk
    add_special_tokens: bool = True  # /tokenize: BOS before a text prompt


MAX_N = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions limit
# structured output: OpenAI's response_format, and vLLM's guided_* fields (one of them per request)
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")

# Every field a request may carry, per endpoint. A field is either honoured (read by the parsers
# below) or refused with a 400 that names it, unless its value is the no-op one (null, or the value
# listed). Fields that by definition do not change the output (``user``, ``metadata``, ...) are
# accepted. Anything else is an unknown field: also a 400 naming it, never silently ignored.
_COMMON = {"model", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
           "stop_token_ids", "ignore_eos", "min_tokens", "max_tokens", "n", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", *STRUCTURED_FIELDS}
_NO_EFFECT = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
_HONOURED = {"completion": _COMMON | _NO_EFFECT | {"prompt", "echo", "best_of"},
             "chat": _COMMON | _NO_EFFECT | {"messages", "top_logprobs", "max_completion_tokens"}}
# field -> (no-op values, why it is refused)
_REFUSED: dict[str, dict[str, tuple[tuple[Any, ...], str]]] = {
    "completion": {
        "suffix": (("",), "'suffix' (fill-in-the-middle) is not supported"),
    },
    "chat": {
        "tools": (([],), "'tools' needs a tool-call parser, and none is configured on this server"),
        "tool_choice": (("none",), "'tool_choice' needs a tool-call parser, and none is configured on this server"),
        "parallel_tool_calls": ((True, False), ""),
        "functions": (([],), "'functions' (deprecated tool calling) is not supported"),
        "function_call": (("none",), "'function_call' (deprecated tool calling) is not supported"),
        "audio": ((), "'audio' output is not supported"),
        "modalities": ((["text"],), "'modalities' other than [\"text\"] are not supported"),
        "prediction": ((), "'prediction' (predicted outputs) is not supported"),
        "web_search_options": ((), "'web_search_options' is not supported"),
        "reasoning_effort": ((), "'reasoning_effort' is not supported by this server"),
        "verbosity": ((), "'verbosity' is not supported by this server"),
    },
}


def check_fields(body: dict, endpoint: str) -> None:
    """400 for an unknown field or a refused one with a value that would change the output."""
    honoured, refused = _HONOURED[endpoint], _REFUSED[endpoint]
    for key, value in body.items():
        if key in honoured:
            continue
        if key in refused:
            no_ops, why = refused[key]
            if value is None or any(value == v and type(value) is type(v) for v in no_ops):
                continue
            raise _bad(why or f"'{key}' is not supported", key)
        where = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        raise _bad(f"unknown field '{shown(key)[1:-1] if isinstance(key, str) else key}' for {where}; "
                   "this server refuses fields it would otherwise ignore", key if isinstance(key, str) else None)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, key: str, default: float | None, kind: type = float) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _bad(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {shown(value)}", key)
    if isinstance(value, int) and not INT64_MIN <= value <= UINT64_MAX:
        raise _bad(f"'{key}' is out of range (at most 64 bits), got {shown(value)}", key)
    return kind(value)


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's ``{"token id as a string": bias}`` as ``{id: bias}`` (ranges checked by SamplingParams;
    ids against the vocabulary by the API server)."""
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for k, v in raw.items():
        key = k.strip() if isinstance(k, str) else ""
        if not key.isdigit() or len(key) > 19 or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad(f"'logit_bias' maps token ids to numbers in [-100, 100], got {shown(k)}: {shown(v)}",
                       "logit_bias")
        out[int(key)] = float(v)
    return out


def _structured(body: dict) -> StructuredOutput | None:
    """The grammar a request's output must follow (``response_format`` json_object / json_schema,
    or vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice``), checked by compiling it."""
    given = [k for k in STRUCTURED_FIELDS if body.get(k) is not None]
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       "response_format")
        if rf["type"] == "text":
            given.remove("response_format")
    if not given:
        return None
    key = given[0]
    if len(given) > 1:
        raise _bad(f"'{given[0]}' and '{given[1]}' both constrain the output; send one of them", given[1])
    value = body[key]
    if key == "response_format":
        extra = set(value) - {"type", "json_schema"}
        if extra:
            raise _bad(f"'response_format' has an unknown field '{sorted(extra)[0]}'", key)
        if value["type"] == "json_object":
            so = StructuredOutput(kind="json_object")
        else:
            js = value.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
                raise _bad("'response_format' json_schema must be {\"name\": ..., \"schema\": {...}}", key)
            so = StructuredOutput(kind="json_schema", spec=_json_text(js.get("schema", {})))
    elif key == "guided_json":
        if isinstance(value, str):  # vLLM takes the schema as an object or as JSON text
            so = StructuredOutput(kind="json_schema", spec=value)
        elif isinstance(value, (dict, bool)):
            so = StructuredOutput(kind="json_schema", spec=_json_text(value))
        else:
            raise _bad("'guided_json' must be a JSON schema (an object or its JSON text)", key)
    elif key == "guided_regex":
        if not isinstance(value, str):
            raise _bad("'guided_regex' must be a string", key)
        so = StructuredOutput(kind="regex", spec=value)
    else:
        if not isinstance(value, list):
            raise _bad("'guided_choice' must be a list of strings", key)
        so = StructuredOutput(kind="choice", spec=_json_text(value))
    try:
        compile_grammar(so)
    except GrammarError as exc:
        raise _bad(f"'{key}': {exc}", key) from None
    return so


def _json_text(value: Any) -> str:
    return json.dumps(value)


def _sampling(body: dict, default_max_tokens: int, logprobs: bool, top_logprobs: int = 0,
              ) -> tuple[SamplingParams, bool, int]:
    n = _number(body, "n", 1, int)
    if not 1 <= n <= MAX_N:
        raise _bad(f"'n' must be an integer in [1, {MAX_N}], got {n}", "n")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    given = body.get(max_key) is not None
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise _bad("'stop' must be a string or a list of strings", "stop")
    stops: list[str] = ([stop] if stop else []) if isinstance(stop, str) else list(stop or [])
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list):
        raise _bad("'stop_token_ids' must be a list of integers", "stop_token_ids")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"'seed' must be an integer, got {shown(seed)}", "seed")
    ignore_eos = body.get("ignore_eos", False)
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    structured = _structured(body)
    if structured is not None and ignore_eos:
        raise _bad("'ignore_eos' cannot be combined with structured output (the grammar ends the output with EOS)",
                   "ignore_eos")
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=_number(body, "top_k", -1, int),
            min_p=_number(body, "min_p", 0.0),
            seed=seed,
            max_tokens=_number(body, max_key, default_max_tokens, int),
            min_tokens=_number(body, "min_tokens", 0, int),
            stop=stops,
            stop_token_ids=stop_ids,
            ignore_eos=bool(ignore_eos),
            logprobs=logprobs,
            presence_penalty=_number(body, "presence_penalty", 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            logit_bias=_logit_bias(body),
            top_logprobs=top_logprobs,
            structured=structured,
        )
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise _bad(str(exc), field) from None
    return params, given, n


def _stream_flags(body: dict) -> tuple[bool, bool, bool]:
    """``stream``, ``stream_options.include_usage`` and ``stream_options.continuous_usage_stats``
    (vLLM's: the running usage on every chunk; guidellm asks for it)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False, False
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    for key, value in opts.items():
        if key not in ("include_usage", "continuous_usage_stats") or not isinstance(value, bool):
            raise _bad(f"'stream_options' takes 'include_usage' and 'continuous_usage_stats' (booleans), got "
                       f"{shown(key)}: {shown(value)}", "stream_options")
    return stream, bool(opts.get("include_usage", False)), bool(opts.get("continuous_usage_stats", False))


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required", "model")
    return model


def parse_completion(body: Any, default_max_tokens: int = 16) -> GenerateRequest:
    """Validate a /v1/completions body (prompt: text, one-element list of text, or token ids)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    check_fields(body, "completion")
    model = _model(body)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _bad("'echo' must be a boolean", "echo")
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_COMPLETION_LOGPROBS):
        raise _bad(f"'logprobs' must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] (the chosen tokens' "
                   "log-probabilities and that many most likely alternatives)", "logprobs")
    params, given, n = _sampling(body, default_max_tokens, lp is not None, lp or 0)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _bad(f"'best_of' must equal 'n' ({n}): ranking candidates by likelihood is not supported", "best_of")
    if echo and lp is not None:
        raise _bad("'echo' with 'logprobs' (prompt log-probabilities) is not supported", "echo")
    stream, usage, continuous = _stream_flags(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    req = GenerateRequest(model, params, stream, usage, max_tokens_given=given, n=n, echo=bool(echo),
                          continuous_usage=continuous)
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("the prompt is empty", "prompt")
        req.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.prompt_ids = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise _bad("the prompt is empty", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("batched prompts are not supported; send one prompt per request", "prompt")
    else:
        raise _bad("'prompt' must be a string or a list of token ids", "prompt")
    return req


def _tools(body: dict) -> tuple[list[dict[str, Any]] | None, Any]:
    """``tools`` and ``tool_choice`` for a server with a tool-call parser (None: no tools offered)."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or any(
            not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict)
            or not isinstance(t["function"].get("name"), str) or not t["function"]["name"] for t in tools)):
        raise _bad("'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}", "tools")
    names = [t["function"]["name"] for t in tools or []]
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if names else "none"
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or fn.get("name") not in names:
            raise _bad(f"'tool_choice' must be none, auto, required or one of the tools "
                       f"({', '.join(names) or 'none given'})", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", ...}", "tool_choice")
    if choice != "none" and not names:
        raise _bad(f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
    if body.get("parallel_tool_calls") is False:
        raise _bad("'parallel_tool_calls' false is not supported (the model may call several tools)",
                   "parallel_tool_calls")
    return (tools if names and choice != "none" else None), choice


def parse_chat(body: Any, tool_parser: str | None = None) -> GenerateRequest:
    """Validate a /v1/chat/completions body (text content only; ``tools`` when the server has a
    tool-call parser)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    tool_fields = {k: body[k] for k in ("tools", "tool_choice", "parallel_tool_calls") if k in body}
    check_fields({k: v for k, v in body.items() if k not in tool_fields} if tool_parser else body, "chat")
    model = _model(body)
    lp = body.get("logprobs", False)
    if lp is None:
        lp = False
    if not isinstance(lp, bool):
        raise _bad("'logprobs' must be a boolean", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise _bad(f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    if top and not lp:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params, given, n = _sampling(body, 1 << 30, lp, top or 0)
    stream, usage, continuous = _stream_flags(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise _bad(f"messages[{i}] must be an object with a role of system, user, assistant or tool", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        if m.get("name") is not None:  # a participant's name: the chat template may render it
            if not isinstance(m["name"], str):
                raise _bad(f"messages[{i}].name must be a string", "messages")
            msg["name"] = m["name"]
        if tool_parser and m["role"] == "assistant" and m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise _bad(f"messages[{i}].tool_calls must be a list", "messages")
            msg["tool_calls"] = m["tool_calls"]
        if tool_parser and m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        parsed.append(msg)
    if not any(m["content"] or m.get("tool_calls") for m in parsed):
        raise _bad("the prompt is empty: every message has empty content", "messages")
    req = GenerateRequest(model, params, stream, usage, messages=parsed, max_tokens_given=given, n=n,
                          continuous_usage=continuous)
    if tool_parser:
        req.tools, req.tool_choice = _tools(tool_fields)
    return req


def parse_tokenize(body: Any) -> GenerateRequest:
    """A /tokenize body (vLLM's): ``model`` and a text ``prompt`` (``add_special_tokens``, default
    true) or chat ``messages``."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
    if unknown:
        raise _bad(f"unknown field '{sorted(unknown)[0]}' for /tokenize", sorted(unknown)[0])
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise _bad("'add_special_tokens' must be a boolean", "add_special_tokens")
    if body.get("add_generation_prompt") not in (None, True):
        raise _bad("'add_generation_prompt' false is not supported", "add_generation_prompt")
    if "messages" in body:
        req = parse_chat({"model": body.get("model"), "messages": body["messages"]})
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _bad("'prompt' must be a string (or send 'messages')", "prompt")
        req = GenerateRequest(_model(body), SamplingParams(), False, False, prompt_text=prompt)
    req.add_special_tokens = special
    return req


def parse_detokenize(body: Any, model: str, vocab_size: int) -> list[int]:
    """A /detokenize body: ``model`` and ``tokens`` (ids in the vocabulary)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = set(body) - {"model", "tokens"}
    if unknown:
        raise _bad(f"unknown field '{sorted(unknown)[0]}' for /detokenize", sorted(unknown)[0])
    if _model(body) != model:
        raise ApiError(404, f"the model '{body['model']}' does not exist; this server serves '{model}'",
                       param="model", code="model_not_found")
    ids = body.get("tokens")
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
                                        for t in ids):
        raise _bad(f"'tokens' must be a list of token ids in [0, {vocab_size})", "tokens")
    return ids
