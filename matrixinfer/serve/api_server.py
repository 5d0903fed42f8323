"""The OpenAI-compatible HTTP API (FastAPI) over a :class:`Backend`: completions, chat completions
(SSE streaming), models, health, metrics.

A request goes: JSON body -> typed request (:mod:`.protocol`) -> prompt token ids -> the backend's
output stream -> one JSON response, or server-sent events. Errors travel as exceptions: the app's
exception handlers turn :class:`ApiError`, the engine's ``RequestError`` (400) and
``EngineDeadError`` (503) into OpenAI error bodies and count them; once a stream has started its
status is sent, so an error then ends the stream with an error event instead.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from matrixinfer import __version__
from matrixinfer.config import ServeConfig
from matrixinfer.engine.errors import EngineDeadError, RequestError, RequestFailedError
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.serve.backend import Backend, PromptTokenizer
from matrixinfer.serve.metrics import ServerMetrics, log_stats_forever
from matrixinfer.serve.protocol import (
    STRUCTURED_FIELDS,
    ApiError,
    GenerateRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from matrixinfer.serve.reasoning import REASONING_PARSERS, ReasoningParser, split_reasoning
from matrixinfer.serve.tool_calls import TOOL_CALL_PARSERS, ToolCallStream, forced_call_prefix, parse_tool_calls

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from matrixinfer.engine.outputs import RequestOutput

T = TypeVar("T")

# What the exception handlers answer (request validation aside); anything else stays a plain 500.
ANSWERED_ERRORS = (ApiError, RequestError, EngineDeadError, RequestFailedError)
_DONE = "data: [DONE]\n\n"
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")  # what --api-key guards
MAX_REQUEST_BYTES = ServeConfig.max_request_bytes  # the default of --max-request-bytes
PREFIX_CHARS_PER_TOKEN = 8  # a longer prompt is first tokenized only this far (_refuse_long_text)
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_tokenize_pool: ThreadPoolExecutor | None = None  # prompts are tokenized off the event loop


def create_app(backend: Backend, api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               reasoning_parser: str | None = None, protect_metrics: bool = False,
               chat_template: str | None = None, tool_call_parser: str | None = None) -> FastAPI:
    """The API app around a backend: the colocated ``AsyncEngine`` or the PDC ``Router``
    (``api_key``: require ``Bearer`` auth on /v1, /tokenize, /detokenize, and on /metrics too with
    ``protect_metrics``; bodies over ``max_request_bytes`` get 413; ``reasoning_parser``: split chat
    answers into ``reasoning_content`` and ``content``, :mod:`.reasoning`; ``chat_template``: a
    template file replacing the checkpoint's; ``tool_call_parser``: accept ``tools`` and return
    ``tool_calls``, :mod:`.tool_calls`)."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {tool_call_parser!r}; known: {', '.join(TOOL_CALL_PARSERS)}")
    if chat_template is not None:
        set_template = getattr(backend.tokenizer, "set_chat_template", None)
        if set_template is None:
            raise ValueError("this backend's tokenizer cannot take another chat template")
        try:
            with open(chat_template) as f:
                set_template(f.read())
        except OSError as exc:
            raise ValueError(f"--chat-template {chat_template}: {exc.strerror or exc}") from None
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; known: {', '.join(REASONING_PARSERS)}")
    metrics = ServerMetrics(lambda: backend.stats, backend.instance_metrics, backend.model_id)
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stats_logger = asyncio.create_task(log_stats_forever(lambda: backend.stats))
        try:
            yield
        finally:
            stats_logger.cancel()

    app = FastAPI(title="MatrixInfer", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.backend = backend
    app.state.metrics = metrics
    _add_error_handlers(app, metrics)
    app.add_middleware(ApiKeyCheck, api_key=api_key, metrics=metrics,
                       prefixes=PROTECTED_PREFIXES + (("/metrics",) if protect_metrics else ()))
    _add_info_routes(app, backend, metrics)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await read_json(request, max_request_bytes)
        req = parse_tokenize(body)
        ids = await asyncio.get_running_loop().run_in_executor(_tokenizer_pool(), tokenize_only, backend, req)
        return JSONResponse({"count": len(ids), "max_model_len": backend.max_seq_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await read_json(request, max_request_bytes)
        ids = parse_detokenize(body, backend.model_id, backend.vocab_size)
        return JSONResponse({"prompt": backend.tokenizer.decode(ids, skip_special_tokens=False)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate_response(request, backend, metrics, chat=False, max_bytes=max_request_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate_response(request, backend, metrics, chat=True, max_bytes=max_request_bytes,
                                       reasoning_parser=reasoning_parser, tool_parser=tool_call_parser)

    return app


# -- errors -------------------------------------------------------------------------------------------

def api_error(exc: Exception) -> ApiError:
    """The OpenAI error an exception is answered with."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):  # a prompt (or an option) the model cannot take
        return ApiError(400, str(exc), param=getattr(exc, "param", None) or "prompt")
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), type_="server_error")
    if isinstance(exc, RequestFailedError):  # this request failed inside the engine; the engine goes on
        return ApiError(500, str(exc), type_="server_error")
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    raise TypeError(f"no API error for {exc!r}")


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation errors (422 by default) as OpenAI's 400, naming the first bad field."""
    errors = list(exc.errors())
    where = [".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors]
    message = "; ".join(f"{w}: {e.get('msg', 'invalid')}" if w else str(e.get("msg", "invalid"))
                        for w, e in zip(where, errors))
    return ApiError(400, message or "invalid request", param=where[0] if where and where[0] else None)


def error_response(err: ApiError, metrics: ServerMetrics) -> JSONResponse:
    """``{"error": {...}}`` with the error's status, counted by status."""
    metrics.errors.labels(str(err.status)).inc()
    return JSONResponse(err.body(), status_code=err.status)


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    async def answer(request: Request, exc: Exception) -> Response:
        return error_response(api_error(exc), metrics)

    async def routing(request: Request, exc: Exception) -> Response:
        """Unknown routes and wrong methods (Starlette's HTTPException) in the OpenAI error shape."""
        status = getattr(exc, "status_code", 500)
        where = f"{request.method} {request.url.path}"
        if status == 404:
            err = ApiError(404, f"unknown route: {where}", code="not_found")
        elif status == 405:
            err = ApiError(405, f"method not allowed: {where}", code="method_not_allowed")
        else:
            err = ApiError(status, f"{where}: {getattr(exc, 'detail', exc)}",
                           type_="server_error" if status >= 500 else "invalid_request_error")
        response = error_response(err, metrics)
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    for kind in (*ANSWERED_ERRORS, RequestValidationError):
        app.add_exception_handler(kind, answer)
    app.add_exception_handler(StarletteHTTPException, routing)


class ApiKeyCheck:
    """Bearer-key check on /v1 (other paths stay open), answering the 401 itself (middleware runs
    outside the exception handlers). A plain ASGI middleware: Starlette's ``@app.middleware("http")``
    wraps the receive channel, so a request could no longer notice that its client left. The key is
    compared as bytes, so a header with any bytes at all is a 401, never a 500."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics,
                 prefixes: tuple[str, ...] = ("/v1",)) -> None:
        self.app = app
        self.prefixes = prefixes
        self.key = api_key.encode() if api_key else b""
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key and scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            given = header[7:].strip() if header[:7].lower() == b"bearer " else b""
            if not given or not secrets.compare_digest(given, self.key):
                msg = "missing API key" if not given else "incorrect API key provided"
                await error_response(ApiError(401, msg, code="invalid_api_key"), self.metrics)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- health, metrics, models ---------------------------------------------------------------------------

def _add_info_routes(app: FastAPI, backend: Backend, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        problem = backend.health()
        if problem is not None:
            return JSONResponse({"status": "error", "error": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": backend.model_id, "object": "model", "created": int(time.time()), "owned_by": "matrixinfer",
                "max_model_len": backend.max_model_len, "vocab_size": backend.vocab_size}

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != backend.model_id:
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves '{backend.model_id}'",
                           param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})


# -- completions and chat completions -------------------------------------------------------------------

@dataclass
class _Call:
    """An accepted request: what its response needs besides the outputs."""

    rid: str
    created: int
    model: str
    chat: bool
    req: GenerateRequest
    n_prompt: int
    tok: PromptTokenizer
    echo_text: str = ""  # completions with echo: the prompt, before each choice's text
    reasoning: list[ReasoningParser] | None = None  # chat with --reasoning-parser: one per choice
    tool_streams: list[ToolCallStream] | None = None  # chat offering tools (--tool-call-parser): one per choice
    tool_prefix: str = ""  # the call that tool_choice opened in the prompt

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The engine requests of ``n`` choices: the same parameters, a seeded request's seed moved on by
    the choice's index (so choices differ yet the request stays reproducible)."""
    if n == 1:
        return [params]
    return [params if params.seed is None or i == 0 else
            msgspec.structs.replace(params, seed=(params.seed + i) % (1 << 64)) for i in range(n)]


async def generate_response(request: Request, backend: Backend, metrics: ServerMetrics, chat: bool,
                            max_bytes: int = MAX_REQUEST_BYTES, reasoning_parser: str | None = None,
                            tool_parser: str | None = None) -> Response:
    """Parse, run and answer one completions (``chat`` False) or chat completions request.

    ``n`` > 1 runs one engine request per choice. The first runs alone until its first token, so
    its prompt's full KV blocks are in the prefix cache when the others start, and they share them."""
    body = await read_json(request, max_bytes)
    def parse() -> GenerateRequest:
        return parse_chat(body, tool_parser) if chat else parse_completion(body)

    if isinstance(body, dict) and any(body.get(k) is not None for k in STRUCTURED_FIELDS):
        # compiling a grammar can take a while for a large schema: not on the event loop
        req = await asyncio.get_running_loop().run_in_executor(_tokenizer_pool(), parse)
    else:
        req = parse()
    ids = await asyncio.get_running_loop().run_in_executor(_tokenizer_pool(), prompt_ids, backend, req)
    call = _Call(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), backend.model_id,
                 chat, req, len(ids), backend.tokenizer)
    if chat and reasoning_parser:
        call.reasoning = [ReasoningParser() for _ in range(req.n)]
    if req.tools:
        call.tool_prefix = forced_call_prefix(req.tool_choice)
        call.tool_streams = [ToolCallStream(call.tool_prefix) for _ in range(req.n)]
    if req.echo:
        call.echo_text = req.prompt_text if req.prompt_text is not None else backend.tokenizer.decode(ids)
    params = choice_params(req.params, req.n)
    streams = [backend.generate(call.rid if req.n == 1 else f"{call.rid}-{i}", ids, p) for i, p in enumerate(params)]
    timing = _Timing(metrics)
    try:
        first = await until_disconnected(request, first_output(streams[0]))
        firsts = [first]
        if first is not None and req.n > 1:
            rest = await until_disconnected(request, _first_outputs(streams[1:]))
            firsts = [first, *rest] if rest is not None else [None]
    except BaseException:
        await _close(streams)
        raise
    if any(f is None for f in firsts):  # the client left while the request was queued: it was aborted
        await _close(streams)
        metrics.aborted.inc()
        return Response(status_code=499)
    outs0 = [f for f in firsts if f is not None]
    timing.token(outs0[0])
    rest_outputs = _merged([(i, s) for i, (s, f) in enumerate(zip(streams, outs0)) if not f.finished])
    if req.stream:
        return StreamingResponse(sse_events(call, rest_outputs, outs0, timing, metrics),
                                 media_type="text/event-stream")
    outs = await collect(request, rest_outputs, outs0, timing)
    if outs is None:
        metrics.aborted.inc()
        return Response(status_code=499)
    return JSONResponse(completion_body(call, outs))


async def _first_outputs(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Every stream's first output; if one fails (or this is cancelled) the others are cancelled."""
    tasks = [asyncio.ensure_future(first_output(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _close(streams: list[AsyncIterator[RequestOutput]]) -> None:
    """Close backend streams (an unfinished one aborts its request)."""
    for s in streams:
        aclose = getattr(s, "aclose", None)
        if aclose is not None:
            await aclose()


async def _merged(streams: list[tuple[int, AsyncIterator[RequestOutput]]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several choices' streams as they come, tagged with the choice index. Closing
    or cancelling this cancels every stream still running (aborting its request)."""
    if len(streams) <= 1:
        for i, s in streams:
            async for out in s:
                yield i, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in streams]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _tokenizer_pool() -> ThreadPoolExecutor:
    global _tokenize_pool
    if _tokenize_pool is None:
        _tokenize_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tokenize")
    return _tokenize_pool


async def read_json(request: Request, max_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """The body as JSON: 413 past ``max_bytes`` (counted as it arrives, never buffered beyond),
    400 for anything that is not strict JSON in valid UTF-8 (lone surrogates, NaN, nesting past
    the recursion limit included)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        if _SURROGATE_ESCAPE.search(raw):
            problem += " (a \\u escape may encode a lone UTF-16 surrogate, which is not valid Unicode)"
        raise ApiError(400, f"invalid JSON body: {problem}") from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {max_bytes} bytes (the server's --max-request-bytes)",
                    code="request_too_large")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client goes away first; cancelling a
    backend stream's iterator aborts its request, queued or running."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.wait({task})
            return None
    return task.result()  # the backend's error, if any, goes to the exception handlers


def prompt_ids(backend: Backend, req: GenerateRequest) -> list[int]:
    """The request's prompt as token ids, checked against the served model and its context length
    (a chat request without max_tokens gets the rest of the context)."""
    if req.model != backend.model_id:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{backend.model_id}'",
                       param="model", code="model_not_found")
    vocab = backend.vocab_size
    if any(t >= vocab for t in req.params.logit_bias):
        raise ApiError(400, f"logit_bias names token {max(req.params.logit_bias)}, outside the vocabulary "
                            f"[0, {vocab})", param="logit_bias")
    limit = backend.max_seq_len
    _refuse_long_text(backend, req, limit)
    try:
        if req.messages is not None:
            if req.tools:  # only then: a tokenizer without tool support still serves plain chats
                ids = backend.tokenizer.encode_chat(req.messages, tools=req.tools,
                                                    suffix=forced_call_prefix(req.tool_choice))
            else:
                ids = backend.tokenizer.encode_chat(req.messages)
        elif req.prompt_ids is not None:
            ids = req.prompt_ids
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        else:
            ids = backend.tokenizer.encode(req.prompt_text or "")
    except ValueError as exc:  # TokenizerError: e.g. the chat template refused the conversation
        raise ApiError(400, f"cannot tokenize the prompt: {exc}",
                       param="messages" if req.messages is not None else "prompt") from None
    if req.messages is not None and not req.max_tokens_given:
        req.params.max_tokens = max(1, limit - len(ids))
    if len(ids) + req.params.max_tokens > limit:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens; the request has "
                            f"{len(ids)} prompt tokens and asks for {req.params.max_tokens} more",
                       param="max_tokens" if req.max_tokens_given else "prompt", code="context_length_exceeded")
    return ids


def tokenize_only(backend: Backend, req: GenerateRequest) -> list[int]:
    """/tokenize: the prompt's token ids as a generation request would see them (no length check)."""
    if req.model != backend.model_id:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{backend.model_id}'",
                       param="model", code="model_not_found")
    try:
        if req.messages is not None:
            return backend.tokenizer.encode_chat(req.messages)
        return backend.tokenizer.encode(req.prompt_text or "", add_special_tokens=req.add_special_tokens)
    except ValueError as exc:
        raise ApiError(400, f"cannot tokenize the prompt: {exc}") from None


def _refuse_long_text(backend: Backend, req: GenerateRequest, limit: int) -> None:
    """A prompt far over the context length is refused after tokenizing a bounded prefix of it,
    never the whole text (issue 19): text longer than ``PREFIX_CHARS_PER_TOKEN`` characters per
    allowed token is cut there, and if that prefix alone has more tokens than the context holds the
    request gets a 400. (A prefix's token count can exceed the whole text's by at most the one
    token that the cut splits, hence the + 1.)"""
    text = req.prompt_text if req.messages is None else "".join(m["content"] for m in req.messages)
    cut = limit * PREFIX_CHARS_PER_TOKEN
    if text is None or len(text) <= cut:
        return
    n = len(backend.tokenizer.encode(text[:cut], add_special_tokens=False))
    if n > limit + 1:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has more than "
                            f"{n - 1} tokens in its first {cut} characters alone",
                       param="messages" if req.messages is not None else "prompt", code="context_length_exceeded")


async def first_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The first output. The backend's refusals (RequestError, EngineDeadError) surface here,
    before any response has started, and reach the exception handlers."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise ApiError(500, "the request ended without output", type_="server_error") from None


async def collect(request: Request, stream: AsyncIterator[tuple[int, RequestOutput]], firsts: list[RequestOutput],
                  timing: _Timing) -> list[list[RequestOutput]] | None:
    """Every choice's outputs, or None when the client went away (its requests are then aborted)."""
    outs = [[f] for f in firsts]

    async def consume() -> list[list[RequestOutput]]:
        async for i, out in stream:
            timing.token(out)
            outs[i].append(out)
        return outs

    return await until_disconnected(request, consume())


def completion_body(call: _Call, choices: list[list[RequestOutput]]) -> dict[str, Any]:
    """The non-streamed ``text_completion`` or ``chat.completion`` object."""
    body: list[dict[str, Any]] = []
    for index, outs in enumerate(choices):
        last = outs[-1]
        text = "".join(o.text for o in outs)
        token_ids = [t for o in outs for t in o.token_ids]
        lps = [lp for o in outs for lp in o.logprobs]
        tops = [t for o in outs for t in o.top_logprobs]
        logprobs = _logprobs(call, token_ids, lps, tops) if call.req.params.logprobs else None
        if call.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish: str | None = last.finish_reason
            if call.reasoning is not None:
                message["reasoning_content"], message["content"] = split_reasoning(text)
            if call.tool_streams is not None:
                message["content"], calls = parse_tool_calls(message["content"] or "", call.tool_prefix)
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
            body.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
        else:
            body.append({"index": index, "text": call.echo_text + text, "finish_reason": last.finish_reason,
                         "logprobs": logprobs})
    return {"id": call.rid, "object": "chat.completion" if call.chat else "text_completion",
            "created": call.created, "model": call.model, "choices": body,
            "usage": _usage(call, [outs[-1] for outs in choices])}


async def sse_events(call: _Call, stream: AsyncIterator[tuple[int, RequestOutput]], firsts: list[RequestOutput],
                     timing: _Timing, metrics: ServerMetrics) -> AsyncIterator[str]:
    """Server-sent events: a chunk per output and choice (chat opens each choice with the assistant
    role; echo opens it with the prompt), the usage chunk when asked for, ``[DONE]``. A client that
    goes away cancels this, which aborts the requests."""
    last = list(firsts)

    def chunk(choice: dict[str, Any]) -> str:  # with continuous_usage_stats, the usage so far on each chunk
        return _chunk(call, choice, _usage(call, last) if call.req.continuous_usage else None)

    for i, first in enumerate(firsts):
        if call.chat:
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        elif call.echo_text:
            yield chunk({"index": i, "text": call.echo_text, "finish_reason": None, "token_ids": []})
        yield chunk(_delta(call, first, i))
    try:
        async for i, out in stream:
            timing.token(out)
            last[i] = out
            yield chunk(_delta(call, out, i))
    except (asyncio.CancelledError, GeneratorExit):  # the client left: the requests are aborted
        metrics.aborted.inc()
        raise
    except ANSWERED_ERRORS as exc:
        err = api_error(exc)
        metrics.errors.labels(str(err.status)).inc()
        yield _event(err.body())
        yield _DONE
        return
    if call.req.include_usage:
        yield _event({"id": call.rid, "object": call.chunk_object, "created": call.created, "model": call.model,
                      "choices": [], "usage": _usage(call, last)})
    yield _DONE


def _delta(call: _Call, out: RequestOutput, index: int = 0) -> dict[str, Any]:
    """One streamed choice: the new text (chat: as a delta), finish reason, logprobs, token ids."""
    c: dict[str, Any]
    if call.chat and (call.reasoning is not None or call.tool_streams is not None):
        reasoning, content = "", out.text
        if call.reasoning is not None:
            parser = call.reasoning[index]
            reasoning, content = parser.feed(out.text)
            if out.finished:
                more = parser.finish()
                reasoning, content = reasoning + more[0], content + more[1]
        delta: dict[str, Any] = {}
        finish: str | None = out.finish_reason
        if call.tool_streams is not None:
            tools = call.tool_streams[index]
            content = tools.feed(content)
            if out.finished:
                rest, calls = tools.finish()
                content += rest
                if calls:
                    delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(calls)]
                    finish = "tool_calls"
        delta.update({k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v})
        c = {"index": index, "delta": delta, "finish_reason": finish}
    elif call.chat:
        c = {"index": index, "delta": {"content": out.text} if out.text else {}, "finish_reason": out.finish_reason}
    else:
        c = {"index": index, "text": out.text, "finish_reason": out.finish_reason}
    if call.req.params.logprobs:
        c["logprobs"] = _logprobs(call, out.token_ids, out.logprobs, out.top_logprobs)
    c["token_ids"] = out.token_ids
    return c


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _chunk(call: _Call, choice: dict[str, Any], usage: dict[str, Any] | None = None) -> str:
    body = {"id": call.rid, "object": call.chunk_object, "created": call.created, "model": call.model,
            "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return _event(body)


def _usage(call: _Call, lasts: list[RequestOutput]) -> dict[str, Any]:
    """OpenAI's usage: the prompt counted once, the completion tokens of every choice."""
    n_out = sum(last.num_output_tokens for last in lasts)
    return {"prompt_tokens": call.n_prompt, "completion_tokens": n_out, "total_tokens": call.n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": lasts[0].num_cached_tokens}}


def _logprobs(call: _Call, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]]
              ) -> dict[str, Any]:
    """The chosen tokens' log-probabilities, and with ``top_logprobs`` (chat) or ``logprobs`` N
    (completions) the most likely alternatives at each position, in the chat or the completions
    layout. Completions' alternatives also hold the chosen token (OpenAI: up to N + 1 entries)."""
    def text(t: int) -> str:
        return call.tok.decode([t], skip_special_tokens=False)

    texts = [text(t) for t in ids]
    want = call.req.params.top_logprobs
    alts = tops if want and len(tops) == len(ids) else [[] for _ in ids]
    if call.chat:
        return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                             "top_logprobs": [{"token": text(a), "logprob": alp, "bytes": list(text(a).encode())}
                                              for a, alp in alt]}
                            for s, lp, alt in zip(texts, lps, alts)]}
    top: list[dict[str, float]] | None = None
    if want:
        top = []
        for s, lp, alt in zip(texts, lps, alts):
            entry = {text(a): alp for a, alp in alt}
            entry.setdefault(s, lp)
            top.append(entry)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": None}


class _Timing:
    """Feeds TTFT, inter-token and end-to-end latency histograms from a request's outputs."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = self.last = time.monotonic()
        self.first = True

    def token(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.first:
            self.m.ttft.observe(now - self.start)
            self.first = False
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        if out.finished:
            self.m.e2e.observe(now - self.start)
            self.m.requests.labels(str(out.finish_reason or "unknown")).inc()
