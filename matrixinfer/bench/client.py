"""The async HTTP driver: sends benchmark requests to an OpenAI-compatible server and times them.

Requests go to ``POST /v1/completions`` with ``stream: true``; the SSE stream is parsed by hand
(``data: {...}`` lines ending with ``data: [DONE]``) so each chunk is timed as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from matrixinfer.bench.datasets import RequestSpec, arrival_offsets
from matrixinfer.bench.metrics import RequestRecord

DEFAULT_VOCAB_SIZE = 1000
DONE = "[DONE]"


@dataclass(frozen=True)
class BenchConfig:
    """How to drive the server."""

    base_url: str = "http://127.0.0.1:8000"
    model: str = ""
    api_key: str | None = None
    request_rate: float = float("inf")  # Poisson arrivals per second; inf sends all at once
    max_concurrency: int | None = None  # at most this many requests in flight
    timeout_s: float = 600.0  # per request, for connect and for each read
    seed: int = 0
    show_progress: bool = True

    def headers(self) -> dict[str, str]:
        """Request headers, with the API key as a Bearer token when one is set."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """The payload of one SSE line: a parsed JSON object, :data:`DONE`, or ``None`` for non-data lines."""
    if not line.startswith("data:"):
        return None  # blank separators, comments (":"), event/id fields
    payload = line[5:].strip()
    if payload == DONE:
        return DONE
    if not payload:
        return None
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object in SSE data line, got {payload[:100]!r}")
    return data


def chunk_tokens(chunk: dict[str, Any]) -> int:
    """How many generated tokens a stream chunk carries (0 for usage-only or empty chunks).

    A chunk with ``token_ids`` counts those; otherwise a chunk with non-empty text (completions
    ``text`` or chat ``delta.content``) counts as one token.
    """
    n = 0
    for choice in chunk.get("choices") or []:
        ids = choice.get("token_ids")
        if ids:
            n += len(ids)
        elif choice.get("text") or (choice.get("delta") or {}).get("content"):
            n += 1
    return n


def request_body(model: str, spec: RequestSpec) -> dict[str, Any]:
    """The /v1/completions body for ``spec``: token-id prompt, exact length output, greedy, streamed."""
    return {
        "model": model,
        "prompt": spec.prompt_ids,
        "max_tokens": spec.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0,
    }


def _error_message(status: int, body: bytes) -> str:
    """``HTTP <status>: <message>``, taking the message from an OpenAI error body when there is one."""
    text = body.decode("utf-8", "replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {text.strip()[:300]}"


async def send_request(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str, spec: RequestSpec, t0: float
) -> RequestRecord:
    """Send one streaming completion and time it; failures are recorded, never raised."""
    record = RequestRecord(prompt_len=spec.prompt_len, output_len=spec.output_len)
    start = time.perf_counter()
    record.start = start - t0
    counted = 0
    usage_tokens: int | None = None
    last: float | None = None
    try:
        async with client.stream("POST", url, json=request_body(model, spec), headers=headers) as resp:
            if resp.status_code != 200:
                record.error = _error_message(resp.status_code, await resp.aread())
                return record
            finished = False
            async for line in resp.aiter_lines():
                data = parse_sse_line(line)
                if data is None:
                    continue
                if data == DONE:
                    finished = True
                    break
                assert isinstance(data, dict)
                if "error" in data:
                    err = data["error"]
                    message = err.get("message") if isinstance(err, dict) else err
                    record.error = f"error in stream: {message}"
                    return record
                n = chunk_tokens(data)
                if n:
                    now = time.perf_counter()
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itls.append(now - last)
                    last = now
                    counted += n
                usage = data.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
            record.e2e = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - any failure is one failed request, reported in the summary
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return record
    if not finished:
        record.error = "stream ended without 'data: [DONE]'"
    elif last is None and spec.output_len > 0:
        record.error = "stream finished without any generated text or tokens"
    else:
        record.output_tokens = usage_tokens if usage_tokens is not None else counted
        record.success = True
    return record


async def fetch_model_info(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> tuple[str, int | None]:
    """The first model id served at ``GET /v1/models`` and its vocab size if the entry states one.

    The vocab size is read from the entry's ``vocab_size`` (or ``meta.n_vocab``), an extension
    to the OpenAI schema.
    """
    url = f"{base_url}/v1/models"
    resp = await client.get(url, headers=headers)
    if resp.status_code != 200:
        raise RuntimeError(f"GET {url} failed: {_error_message(resp.status_code, resp.content)}")
    models = resp.json().get("data") or []
    if not models:
        raise RuntimeError(f"GET {url} listed no models; pass --model")
    entry = models[0]
    vocab = entry.get("vocab_size") or (entry.get("meta") or {}).get("n_vocab")
    return str(entry["id"]), int(vocab) if vocab else None


async def resolve_model(config: BenchConfig, vocab_size: int | None) -> tuple[str, int]:
    """Fill in the model id and vocab size from ``GET /v1/models`` where they were not given.

    Falls back to :data:`DEFAULT_VOCAB_SIZE` when the server does not report a vocab size; an
    unreachable server is an error only when the model id is needed.
    """
    if config.model and vocab_size:
        return config.model, vocab_size
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        try:
            model, served_vocab = await fetch_model_info(client, config.base_url.rstrip("/"), config.headers())
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            if not config.model:
                raise RuntimeError(f"cannot find the model id at {config.base_url}/v1/models: {exc}") from exc
            model, served_vocab = config.model, None
    return config.model or model, vocab_size or served_vocab or DEFAULT_VOCAB_SIZE


async def run_benchmark(specs: list[RequestSpec], config: BenchConfig) -> tuple[list[RequestRecord], float]:
    """Send every request (Poisson arrivals, capped concurrency); return records in spec order and duration (s)."""
    from tqdm.auto import tqdm

    if not config.model:
        raise ValueError("BenchConfig.model is empty; resolve it with resolve_model() first")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise ValueError(f"max concurrency must be at least 1, got {config.max_concurrency}")
    url = f"{config.base_url.rstrip('/')}/v1/completions"
    offsets = arrival_offsets(len(specs), config.request_rate, config.seed)
    width = max(1, min(config.max_concurrency or len(specs), len(specs)))
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    headers = config.headers()
    bar = tqdm(total=len(specs), desc="bench", unit="req", disable=not config.show_progress)

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(config.timeout_s)) as client:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec, offset: float) -> RequestRecord:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                record = await send_request(client, url, headers, config.model, spec, t0)
            else:
                async with gate:
                    record = await send_request(client, url, headers, config.model, spec, t0)
            bar.update(1)
            return record

        records = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets)))
        duration = time.perf_counter() - t0
    bar.close()
    return list(records), duration
