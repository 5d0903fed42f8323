"""The HTTP server's connection limits (serve/http_guard.py): a client that sends its request a byte at
a time is disconnected at the read deadline, connections past the cap are closed at once, and neither
limit touches a request that arrives in time or a response that streams for longer than the deadline.
uvicorn runs in a thread of the test process with a small ASGI app (about 10 s in all); the real
deployment's wiring is checked in test_bad_requests_served.py."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from matrixinfer.config import ServeConfig
from matrixinfer.serve.http_guard import uvicorn_config

DEADLINE_S = 0.6
CAP = 4


async def app(scope, receive, send):  # a minimal ASGI app: reads the whole body, then answers
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    chunks = 4 if scope["path"] == "/stream" else 1
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for i in range(chunks):
        if i:
            await asyncio.sleep(0.5)  # a stream that outlasts the read deadline
        await send({"type": "http.response.body", "body": b"ok%d;" % len(body), "more_body": i < chunks - 1})


@pytest.fixture(scope="module")
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    cfg = ServeConfig(port=free, log_level="warning", request_read_timeout=DEADLINE_S, max_connections=CAP)
    server = uvicorn.Server(uvicorn_config(app, cfg))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield free
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _closed_after(s: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``s`` (reading any answer first); fails past ``limit``."""
    start = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {limit} s")
    return time.monotonic() - start


def _request(port: int, path: str = "/", body: bytes = b"x" * 10) -> bytes:
    with _connect(port) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                  % (path.encode(), len(body), body))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline(port):
    s = _connect(port)
    start = time.monotonic()
    with s:
        try:
            for byte in b"POST / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100:
                s.send(bytes([byte]))
                time.sleep(0.1)
                assert time.monotonic() - start < DEADLINE_S + 2, "still reading a request past its deadline"
        except (BrokenPipeError, ConnectionResetError):
            pass
        _closed_after(s, 3)
    assert time.monotonic() - start >= DEADLINE_S * 0.9


def test_a_stalled_body_is_cut_off_and_others_are_served_meanwhile(port):
    with _connect(port) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"y" * 10)
        assert b"ok10;" in _request(port)  # another client is served while this one stalls
        took = _closed_after(s, 3)
        assert took <= DEADLINE_S + 0.5


def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline(port):
    with _connect(port) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab")
        time.sleep(DEADLINE_S * 0.8)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200") and b"ok2;" in answer
        s.sendall(b"POST / HTTP/1.1\r\nHo")  # the next request starts, then stalls
        _closed_after(s, 3)


def test_a_request_in_time_and_a_long_stream_are_untouched(port):
    with _connect(port) as s:  # the headers in two parts, inside the deadline
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\n")
        time.sleep(DEADLINE_S * 0.5)
        s.sendall(b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"ok3;" in data
    streamed = _request(port, "/stream")  # 1.5 s of streaming, past the 1 s read deadline
    assert streamed.count(b"ok10;") == 4, streamed


def test_connections_past_the_cap_are_closed_at_once(port):
    held = [_connect(port) for _ in range(CAP)]
    try:
        time.sleep(0.2)
        with _connect(port) as extra:
            assert _closed_after(extra, 0.5 * DEADLINE_S) < 0.5 * DEADLINE_S
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert b"ok10;" in _request(port)  # below the cap again
