"""The issue 19 probes against a real P/D deployment (router, prefill and decode processes on
loopback): each is answered (200 with a normal completion, or a 4xx with the OpenAI body), and
afterwards the deployment is healthy, every instance is still registered and a normal request is
served."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.serve.helpers import API_KEY, HEADERS, Server

PROBES = [
    {"temperature": 1e-300}, {"top_p": 1e-300}, {"top_k": 1 << 63}, {"seed": 1 << 64}, {"seed": (1 << 64) - 1},
    {"stop_token_ids": [True]}, {"stop_token_ids": [1 << 64]}, {"max_tokens": 1 << 64}, {"temperature": 1e-3},
    {"top_k": (1 << 63) - 1, "top_p": 5e-324, "seed": -(1 << 63)}, {"stop": ["\ud800"]}, {"model": "\udfff"},
]
RAW = [b'{"model": "tiny", "prompt": "a\\ud800", "max_tokens": 2}', b"[" * 50_000 + b"]" * 50_000,
       b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"]


@pytest.fixture(scope="module")
def deployment(served_checkpoint):
    """P/D (the colocated engine meets the same probes in process: test_request_isolation, test_api_fuzz)."""
    srv = Server(served_checkpoint, "--kv-cache-memory", str(8 << 20), "--num-prefill", "1", "--num-decode", "1",
                 "--num-ems", "0", "--reserve-timeout", "10", "--request-read-timeout", "2", api_key=API_KEY)
    yield srv
    srv.stop()


def test_probes_are_answered_and_the_deployment_stays_up(deployment):
    url = f"{deployment.url}/v1/completions"
    instances = deployment.instance_metrics()
    with httpx.Client(timeout=60, headers=HEADERS) as client:
        for probe in PROBES:
            body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 4, **probe}).encode()  # \u escapes
            r = client.post(url, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code in (200, 400, 404), (probe, r.status_code, r.text)
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] >= 1, probe
            else:
                assert r.json()["error"]["type"] == "invalid_request_error", probe
        for raw in RAW:
            r = client.post(url, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (raw[:40], r.text)
        r = client.post(url, json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0,
                                   "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(f"{deployment.url}/health", timeout=10).status_code == 200
    assert instances and {k: set(v) for k, v in deployment.instance_metrics().items()} == \
        {k: set(v) for k, v in instances.items()}  # the same instances are still registered


def test_a_byte_at_a_time_client_is_disconnected_while_others_are_served(deployment):
    """A "slowloris" client (its headers never end) is cut off at --request-read-timeout (2 s here);
    meanwhile a normal request is served."""
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")
        r = httpx.post(f"{deployment.url}/v1/completions", headers=HEADERS, timeout=30,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200
        try:
            for _ in range(40):  # a byte every 0.25 s: without the deadline this would go on for 10 s
                s.sendall(b"a")
                time.sleep(0.25)
            closed = False
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        if not closed:
            s.settimeout(1)
            try:
                closed = s.recv(1) == b""
            except TimeoutError:
                closed = False
        assert closed and time.monotonic() - start < 8


def test_the_workers_loading_bars_are_not_split_into_lines(deployment):
    """Each worker's weight-loading bar is one bar in the launcher's output (tqdm redraws it with
    carriage returns), not one line per redraw as when the children's bars were piped through."""
    with open(deployment.log_path, newline="") as f:  # keep the carriage returns
        lines = f.read().split("\n")
    for child in ("prefill0", "decode0"):
        bars = [line for line in lines if f"[{child}] loading" in line]
        assert len(bars) == 1, bars
    assert "@@progress" not in "\n".join(lines)
