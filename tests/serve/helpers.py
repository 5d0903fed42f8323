"""What the serve tests share: a ``matrixinfer serve`` process on a test checkpoint, the API key
it is started with, and a streamed completion read token by token.

Importable from child processes too (the multi-host test's client imports :func:`stream_tokens`).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx

from matrixinfer.bench.client import DONE, parse_sse_line
from matrixinfer.bench.launch import ServerProcess

API_KEY = "test-key-123"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


class Server(ServerProcess):
    """``matrixinfer serve`` on a test checkpoint, served as ``tiny`` (colocated unless PDC flags are given).

    Metrics and worker processes are read through :class:`ServerProcess`: ``metrics()``,
    ``instance_metrics()``, ``child_pid(needle)``.
    """

    def __init__(self, model_dir: str | Path, *extra: str, api_key: str | None = None, device: str = "cpu") -> None:
        # The device is stated, never defaulted: on a machine with a GPU the server would otherwise run
        # in bfloat16 on CUDA while the tests compare with float32 CPU references.
        dtype = "float32" if device == "cpu" else "bfloat16"
        args = ["--model", str(model_dir), "--served-model-name", "tiny", "--device", device, "--dtype", dtype,
                "--log-level", os.environ.get("MI_TEST_LOG", "warning"), *extra]
        if "--num-prefill" not in extra:
            args.append("--colocated")
        if api_key:
            args += ["--api-key", api_key]
        self.api_key = api_key
        super().__init__(args, env={"MATRIXINFER_THREADS": "1"}, timeout=180)


async def stream_tokens(client: httpx.AsyncClient, url: str, body: dict[str, Any], stop_after: int | None = None,
                        headers: dict[str, str] | None = None, started: asyncio.Event | None = None,
                        started_at: int = 1) -> tuple[list[int], str | None]:
    """Token ids and finish reason of one streamed completion at ``url`` (sent with :data:`HEADERS`
    unless ``headers`` are given).

    With ``stop_after`` the client disconnects once it has that many tokens (reason
    ``"disconnected"``); an error event ends the stream with reason ``"error: <message>"``.
    ``started`` is set once ``started_at`` tokens have arrived (in P/D the first comes from the
    prefill instance, the second from the decode instance).
    """
    ids: list[int] = []
    reason = None
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                             headers=HEADERS if headers is None else headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            chunk = parse_sse_line(line)
            if chunk == DONE:
                break
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                return ids, f"error: {chunk['error']['message']}"
            for c in chunk["choices"]:
                ids.extend(c["token_ids"])
                reason = c["finish_reason"] or reason
            if started is not None and len(ids) >= started_at:
                started.set()
            if stop_after is not None and len(ids) >= stop_after:
                return ids, "disconnected"
    return ids, reason


def wait_idle(server: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """The server's metrics once no request runs or waits and no KV block is in use, or at ``timeout``
    (the caller asserts what it needs: a disconnect is noticed, and its blocks freed, asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m["matrixinfer_requests_running"] == m["matrixinfer_requests_waiting"] == 0 \
            and m["matrixinfer_kv_cache_blocks_used"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def child_restarts(server: ServerProcess) -> dict[str, float]:
    """``matrixinfer_child_restarts_total`` per child process of a PDC launcher."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return {s.labels["child"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "matrixinfer_child_restarts_total"}


def listening_ports(pid: int) -> list[int]:
    """TCP ports process ``pid`` listens on (from /proc: its socket inodes in the LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


# -- structured output and top_logprobs (issue 18) -----------------------------------------------------
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "colour": {"enum": ["red", "green"]},
                                           "tag": {"type": "string", "maxLength": 5}},
          "required": ["n", "colour", "tag"], "additionalProperties": False}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


def matches_schema(text: str) -> bool:
    """Whether ``text`` is JSON that validates against :data:`SCHEMA` (checked by hand: no
    validator package is a dependency)."""
    import json

    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return (isinstance(obj, dict) and set(obj) == {"n", "colour", "tag"} and type(obj["n"]) is int
            and obj["colour"] in ("red", "green") and isinstance(obj["tag"], str) and len(obj["tag"]) <= 5)


def stream_chat(url: str, body: dict[str, Any]) -> tuple[list[int], str, str | None, list[dict[str, Any]]]:
    """A streamed chat completion: token ids, text, finish reason and the logprobs entries."""
    import json

    ids: list[int] = []
    text, reason, entries = "", None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for c in json.loads(line[6:])["choices"]:
                ids += c.get("token_ids", [])
                text += c["delta"].get("content") or ""
                reason = c["finish_reason"] or reason
                entries += (c.get("logprobs") or {}).get("content") or []
    return ids, text, reason, entries


def reference_logprobs(checkpoint: str | Path, ids: list[int]) -> Any:
    """``log_softmax`` of transformers' own model's logits at every position of ``ids`` (float32)."""
    import torch

    from tests.checkpoints import load_reference

    with torch.no_grad():
        return load_reference(Path(checkpoint))(torch.tensor([ids])).logits[0].log_softmax(-1)


def check_top_logprobs(checkpoint: str | Path, prompt_ids: list[int], ids: list[int], entries: list[dict[str, Any]],
                       k: int) -> None:
    """Greedy chat output's ``top_logprobs``: k alternatives per token, sorted, the chosen token
    first, and their log-probabilities those of the reference model at that position."""
    ref = reference_logprobs(checkpoint, prompt_ids + ids)
    assert len(entries) == len(ids) > 0
    for i, (token, e) in enumerate(zip(ids, entries)):
        row = ref[len(prompt_ids) - 1 + i]
        alts = e["top_logprobs"]
        values = [a["logprob"] for a in alts]
        assert len(alts) == k and values == sorted(values, reverse=True)
        assert alts[0]["token"] == e["token"] and alts[0]["logprob"] == e["logprob"]  # greedy: chosen is the top
        assert int(row.argmax()) == token
        assert abs(e["logprob"] - float(row[token])) < 1e-4
        expect = row.topk(k).values.tolist()
        assert max(abs(a - b) for a, b in zip(values, expect)) < 1e-4, (values, expect)
