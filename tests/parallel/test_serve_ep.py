"""``matrixinfer serve --ep 2`` as a user runs it: requests spread over both ranks give the greedy
tokens of one process; ``/metrics`` and ``/ep/load`` (``matrixinfer ep-load``) report per-rank and
per-expert load; killing a rank mid-request ends that request with a clean error within 30 s and
no rank process is left waiting. Costs ~40 s (a server and a rank process start)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from tests.helpers import REPO, python_env
from tests.serve.helpers import API_KEY, HEADERS, Server, stream_tokens

PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 75)), [3, 9, 27, 81], list(range(100, 118))]


async def _all(url: str, max_tokens: int) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=120) as client:
        runs = [stream_tokens(client, url, {"model": "tiny", "prompt": p, "max_tokens": max_tokens,
                                            "temperature": 0, "ignore_eos": True}) for p in PROMPTS]
        return [ids for ids, _ in await asyncio.gather(*runs)]


def test_serve_ep2_outputs_metrics_snapshot_and_rank_death(served_checkpoint):
    expect = LLMEngine(EngineConfig(model=str(served_checkpoint), device="cpu", dtype="float32",
                                    kv_cache_memory=4 << 20)).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    server = Server(served_checkpoint, "--ep", "2", "--ep-timeout", "10", "--kv-cache-memory", str(4 << 20),
                    api_key=API_KEY)
    try:
        got = asyncio.run(_all(server.url, 12))
        assert got == expect
        snap = httpx.get(f"{server.url}/ep/load", timeout=10).json()
        assert snap["ep"] == 2 and snap["placement"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        ranks = snap["ranks"]
        assert all(r["tokens"] > 0 for r in ranks), "requests were not spread over both ranks"
        moe_layers = len(snap["expert_tokens"])
        assert moe_layers == 2  # 3 layers, the first dense
        assert sum(map(sum, snap["expert_tokens"])) == 2 * moe_layers * sum(r["tokens"] for r in ranks)  # top-2
        assert sum(r["dispatch_bytes"] for r in ranks) > 0 and snap["imbalance"] >= 1.0
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'matrixinfer_ep_expert_tokens_total{expert="5",layer="1",rank="1"}' in text
        assert 'matrixinfer_ep_dispatch_bytes_total{rank="1"}' in text
        out = subprocess.run([sys.executable, "-m", "matrixinfer.cli", "ep-load", "--url", server.url],
                             capture_output=True, text=True, env=python_env(), cwd=REPO, timeout=60)
        assert out.returncode == 0 and json.loads(out.stdout)["placement"] == snap["placement"]

        rank1 = server.child_pid("matrixinfer.parallel.rank")
        t0 = [0.0]

        async def killed_mid_request() -> tuple[list[int], str | None]:
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                async with client.stream("POST", f"{server.url}/v1/completions", headers=HEADERS, json=body) as r:
                    lines = []
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if len(lines) == 3:
                            os.kill(rank1, signal.SIGKILL)
                            t0[0] = time.monotonic()
                    return lines, None

        lines, _ = asyncio.run(killed_mid_request())
        waited = time.monotonic() - t0[0]
        assert t0[0], lines
        assert waited < 30, f"the request took {waited:.1f} s to end after the rank died"
        print(f"rank killed -> request ended with an error after {waited:.1f} s")
        assert any('"error"' in line for line in lines), lines[-3:]
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and "EP rank" in health.json()["error"]
        assert not [pid for pid, cmd in server.children() if "matrixinfer.parallel.rank" in cmd
                    and pid != rank1 and _alive(pid)]
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
