"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from matrixinfer.engine.async_engine import EngineDeadError
from matrixinfer.engine.llm_engine import RequestError
from matrixinfer.serve.metrics import ServerMetrics
from matrixinfer.serve.protocol import ApiError, GenerateRequest, parse_chat, parse_completion

Backend = Any  # AsyncEngine or Router: model_id, tokenizer, max_model_len, max_seq_len, vocab_size,
# alive, error, stats, generate(request_id, prompt_ids, params) -> async iterator of RequestOutput


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(engine: Backend, api_key: str | None = None) -> FastAPI:
    """The API app around a backend: the colocated :class:`AsyncEngine` or the PDC router
    (``api_key``: require ``Bearer`` auth on /v1)."""
    tok = engine.tokenizer
    model_id = engine.model_id
    metrics = ServerMetrics(lambda: engine.stats, getattr(engine, "instance_metrics", None))
    app = FastAPI(title="MatrixInfer", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not given or not secrets.compare_digest(given, api_key):
                metrics.errors.labels("401").inc()
                msg = "missing API key" if not given else "incorrect API key provided"
                return _error(ApiError(401, msg, code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": int(time.time()), "owned_by": "matrixinfer",
            "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size}]}

    async def _body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from None

    def _prepare(req: GenerateRequest) -> list[int]:
        if req.model != model_id:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")
        if req.messages is not None:
            ids = tok.encode_chat(req.messages)
        elif req.prompt_ids is not None:
            ids = req.prompt_ids
        else:
            ids = tok.encode(req.prompt_text)
        limit = engine.max_seq_len
        if req.messages is not None and not req.max_tokens_given:
            req.params.max_tokens = max(1, limit - len(ids))
        if len(ids) + req.params.max_tokens > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the request has "
                                f"{len(ids)} prompt tokens and asks for {req.params.max_tokens} more",
                           param="max_tokens" if req.max_tokens_given else "prompt", code="context_length_exceeded")
        return ids

    async def _run(request: Request, req: GenerateRequest, chat: bool):
        ids = _prepare(req)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = engine.generate(rid, ids, req.params)
        timing = _Timing(metrics)
        try:
            first = await stream.__anext__()  # surfaces engine-side request errors as 400
        except RequestError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        except EngineDeadError as exc:
            raise ApiError(503, str(exc), type_="server_error") from None
        except StopAsyncIteration:
            raise ApiError(500, "the request ended without output", type_="server_error") from None
        timing.token(first)
        if req.stream:
            return StreamingResponse(_sse(stream, first, rid, created, req, chat, len(ids), timing),
                                     media_type="text/event-stream")
        return await _collect(request, stream, first, rid, created, req, chat, len(ids), timing)

    async def _collect(request, stream, first, rid, created, req, chat, n_prompt, timing):
        outs = [first]

        async def consume():
            if first.finished:
                return
            async for out in stream:
                timing.token(out)
                outs.append(out)

        task = asyncio.ensure_future(consume())
        while not task.done():  # a client that goes away aborts its request
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                await stream.aclose()
                return Response(status_code=499)
        try:
            task.result()
        except EngineDeadError as exc:
            raise ApiError(503, str(exc), type_="server_error") from None
        text = "".join(o.text for o in outs)
        last = outs[-1]
        usage = _usage(n_prompt, last.num_output_tokens, last.num_cached_tokens)
        lps = [lp for o in outs for lp in o.logprobs]
        token_ids = [t for o in outs for t in o.token_ids]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": last.finish_reason,
                      "logprobs": _chat_logprobs(tok, token_ids, lps) if req.params.logprobs else None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": last.finish_reason,
                      "logprobs": _completion_logprobs(tok, token_ids, lps) if req.params.logprobs else None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice], "usage": usage}

    async def _sse(stream, first, rid, created, req, chat, n_prompt, timing) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        last = first
        if chat:
            yield _chunk(rid, obj, created, model_id, {"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None})

        def piece(out):
            if chat:
                c = {"index": 0, "delta": {"content": out.text} if out.text else {},
                     "finish_reason": out.finish_reason}
                if req.params.logprobs:
                    c["logprobs"] = _chat_logprobs(tok, out.token_ids, out.logprobs)
            else:
                c = {"index": 0, "text": out.text, "finish_reason": out.finish_reason}
                if req.params.logprobs:
                    c["logprobs"] = _completion_logprobs(tok, out.token_ids, out.logprobs)
            c["token_ids"] = out.token_ids
            return _chunk(rid, obj, created, model_id, c)

        yield piece(first)
        if not first.finished:
            try:
                async for out in stream:  # cancelled on client disconnect -> the engine aborts the request
                    timing.token(out)
                    last = out
                    yield piece(out)
            except (ApiError, EngineDeadError) as exc:
                err = exc if isinstance(exc, ApiError) else ApiError(503, str(exc), type_="server_error")
                metrics.errors.labels(str(err.status)).inc()
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
        if req.include_usage:
            usage = _usage(n_prompt, last.num_output_tokens, last.num_cached_tokens)
            yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model_id, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def _handle(request: Request, chat: bool):
        try:
            body = await _body(request)
            return await _run(request, parse_chat(body) if chat else parse_completion(body), chat=chat)
        except ApiError as exc:
            metrics.errors.labels(str(exc.status)).inc()
            return _error(exc)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(request, chat=True)

    return app


class _Timing:
    """Feeds TTFT, inter-token and end-to-end latency histograms from a request's outputs."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = self.last = time.monotonic()
        self.first = True

    def token(self, out) -> None:
        now = time.monotonic()
        if self.first:
            self.m.ttft.observe(now - self.start)
            self.first = False
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        if out.finished:
            self.m.e2e.observe(now - self.start)
            self.m.requests.labels(out.finish_reason or "unknown").inc()


def _chunk(rid: str, obj: str, created: int, model: str, choice: dict) -> str:
    return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model, 'choices': [choice]})}\n\n"


def _usage(n_prompt: int, n_out: int, n_cached: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def _completion_logprobs(tok, ids: list[int], lps: list[float]) -> dict:
    tokens = [tok.decode([t], skip_special_tokens=False) for t in ids]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": None}


def _chat_logprobs(tok, ids: list[int], lps: list[float]) -> dict:
    texts = [tok.decode([t], skip_special_tokens=False) for t in ids]
    return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                        for s, lp in zip(texts, lps)]}
