"""A tiny fake OpenAI-compatible streaming server for testing the benchmark client.

Plain asyncio HTTP/1.1 (keep-alive, chunked responses) on 127.0.0.1 in a background thread.
``POST /v1/completions`` waits ``ttft_s``, then streams one chunk per requested token every
``itl_s``, then a usage chunk and ``data: [DONE]``. Prompts longer than ``max_prompt_len`` get an
OpenAI-style 400 error. It records every request body and the peak number of requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

STATUS_TEXT = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}


class FakeServer:
    """Context manager running the fake server; ``base_url`` is set once it is listening."""

    def __init__(
        self,
        ttft_s: float = 0.05,
        itl_s: float = 0.01,
        model: str = "fake-model",
        vocab_size: int = 500,
        api_key: str | None = None,
        max_prompt_len: int = 10_000,
    ) -> None:
        self.ttft_s, self.itl_s = ttft_s, itl_s
        self.model, self.vocab_size, self.api_key = model, vocab_size, api_key
        self.max_prompt_len = max_prompt_len
        self.bodies: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> FakeServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(timeout=5)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._route(method, path, headers, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _route(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        auth = headers.get("authorization")
        if self.api_key and auth != f"Bearer {self.api_key}":
            return await self._json(writer, 401, _error("invalid API key", "authentication_error"))
        if method == "GET" and path == "/v1/models":
            entry = {"id": self.model, "object": "model", "vocab_size": self.vocab_size}
            return await self._json(writer, 200, {"object": "list", "data": [entry]})
        if method != "POST" or path != "/v1/completions":
            return await self._json(writer, 404, _error(f"no route {method} {path}", "not_found_error"))
        request = json.loads(body)
        self.bodies.append(request)
        self.auth_headers.append(auth)
        if len(request["prompt"]) > self.max_prompt_len:
            message = f"prompt has {len(request['prompt'])} tokens, more than {self.max_prompt_len}"
            return await self._json(writer, 400, _error(message, "invalid_request_error"))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await self._stream(writer, request)
        finally:
            self.in_flight -= 1

    async def _stream(self, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        await writer.drain()
        n = int(request["max_tokens"])
        for i in range(n):
            await asyncio.sleep(self.ttft_s if i == 0 else self.itl_s)
            chunk = {"object": "text_completion", "model": self.model, "choices": [{"index": 0, "text": f" t{i}"}]}
            await _send_chunk(writer, f"data: {json.dumps(chunk)}\n\n")
        usage = {"prompt_tokens": len(request["prompt"]), "completion_tokens": n, "total_tokens": 0}
        await _send_chunk(writer, f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _json(self, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        head = f"HTTP/1.1 {status} {STATUS_TEXT[status]}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _send_chunk(writer: asyncio.StreamWriter, text: str) -> None:
    data = text.encode()
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()
