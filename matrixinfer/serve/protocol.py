"""Parsing and validating OpenAI-style request bodies into typed requests (pure, no I/O).

Every problem becomes an :class:`ApiError` carrying the HTTP status and the OpenAI error fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matrixinfer.engine.sampling_params import INT64_MIN, UINT64_MAX, SamplingParams, shown


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
    messages: list[dict[str, str]] | None = None
    max_tokens_given: bool = False


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


def _sampling(body: dict, default_max_tokens: int, logprobs: bool) -> tuple[SamplingParams, bool]:
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0) != 0.0:
            raise _bad(f"'{key}' is not supported (only 0)", key)
    n = _number(body, "n", 1, int)
    if n != 1:
        raise _bad(f"'n' must be 1 (got {n}); request several completions separately", "n")
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
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=_number(body, "top_k", -1, int),
            seed=seed,
            max_tokens=_number(body, max_key, default_max_tokens, int),
            min_tokens=_number(body, "min_tokens", 0, int),
            stop=stops,
            stop_token_ids=stop_ids,
            ignore_eos=bool(body.get("ignore_eos", False)),
            logprobs=logprobs,
        )
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise _bad(str(exc), field) from None
    return params, given


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return stream, bool(opts.get("include_usage", False))


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required", "model")
    return model


def parse_completion(body: Any, default_max_tokens: int = 16) -> GenerateRequest:
    """Validate a /v1/completions body (prompt: text, one-element list of text, or token ids)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _model(body)
    if body.get("echo"):
        raise _bad("'echo' is not supported", "echo")
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or lp < 0 or lp > 1):
        raise _bad("'logprobs' must be 0 or 1 (log-probabilities of the chosen tokens)", "logprobs")
    params, given = _sampling(body, default_max_tokens, lp is not None)
    stream, usage = _stream_flags(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    req = GenerateRequest(model, params, stream, usage, max_tokens_given=given)
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


def parse_chat(body: Any) -> GenerateRequest:
    """Validate a /v1/chat/completions body (text content only)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _model(body)
    lp = body.get("logprobs", False)
    if not isinstance(lp, bool):
        raise _bad("'logprobs' must be a boolean", "logprobs")
    if body.get("top_logprobs"):
        raise _bad("'top_logprobs' is not supported (only the chosen tokens' log-probabilities)", "top_logprobs")
    params, given = _sampling(body, 1 << 30, lp)
    stream, usage = _stream_flags(body)
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
        parsed.append({"role": m["role"], "content": content})
    if not any(m["content"] for m in parsed):
        raise _bad("the prompt is empty: every message has empty content", "messages")
    return GenerateRequest(model, params, stream, usage, messages=parsed, max_tokens_given=given)
