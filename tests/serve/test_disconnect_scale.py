"""Issue 18 (defect 1): many streams dropped while queued or prefilling stop costing compute at once.

256 streamed requests, each asking for far more tokens than the engine can produce in the test's
time, are sent to a server that runs a few at a time; the client then leaves. Every request, queued,
prefilling or decoding, must be aborted: the engine goes idle within 2 s (the issue's bar; before the
fix a queued stream was watched only after its first token and ran to completion).
About 45 s per deployment on a loaded 2-core machine (a server start plus 256 streams).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.serve.helpers import API_KEY, HEADERS, Server

N_STREAMS = 256
IDLE_WITHIN_S = 2.0


async def _send_and_drop(url: str, n: int, hold_s: float) -> list[str]:
    """Open ``n`` streams (long prompts, long outputs; each alone would run for seconds), leave
    after ``hold_s``; the server's metrics text just before leaving."""

    async def one(client: httpx.AsyncClient, k: int) -> None:
        body = {"model": "tiny", "prompt": [(7 * k + i) % 250 + 3 for i in range(120)], "max_tokens": 380,
                "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=HEADERS) as r:
            assert r.status_code == 200, await r.aread()
            async for _ in r.aiter_lines():
                pass

    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(one(client, k)) for k in range(n)]
        await asyncio.sleep(hold_s)
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
        assert not failed, failed[:3]
        before = (await client.get(f"{url}/metrics")).text.splitlines()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return before


def _busy(server: Server, pdc: bool) -> float:
    if pdc:
        m = server.instance_metrics()
        return sum(sum(m.get(k, {}).values()) for k in ("running", "waiting", "kv_used", "reserved_blocks"))
    m = server.metrics()
    return m["matrixinfer_requests_running"] + m["matrixinfer_requests_waiting"] + m["matrixinfer_kv_cache_blocks_used"]


def _seconds_to_idle(server: Server, pdc: bool, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while _busy(server, pdc) and time.monotonic() - start < timeout:
        time.sleep(0.05)
    return time.monotonic() - start


def _check_drop(server: Server, pdc: bool) -> None:
    before = asyncio.run(_send_and_drop(server.url, N_STREAMS, hold_s=3.0))
    waiting = sum(float(line.split()[-1]) for line in before if line.startswith("matrixinfer_requests_waiting "))
    finished = sum(float(line.split()[-1]) for line in before if line.startswith("matrixinfer_requests_total{"))
    # most requests were unfinished (queued at the router or an engine, or running): on a 2-core Zen 4 VM
    # (2026-12-01) the colocated engine had finished 64 of the 256 by the drop
    assert finished < N_STREAMS / 2
    idle_after = _seconds_to_idle(server, pdc)
    tokens = server.metrics()["matrixinfer_generation_tokens_total"]
    time.sleep(0.5)
    assert server.metrics()["matrixinfer_generation_tokens_total"] == tokens  # nothing is computed any more
    print(f"{N_STREAMS} streams dropped ({finished:.0f} finished, {waiting:.0f} waiting in an engine): "
          f"idle after {idle_after:.2f} s")
    assert idle_after < IDLE_WITHIN_S, f"{N_STREAMS} dropped streams kept the engine busy for {idle_after:.1f} s"
    # every request still unfinished when its client left is aborted: each of the 256 either finished (counted
    # now, after the drop: on a 2-core Zen 4 VM 10 of them finished between the read above and the drop) or
    # was aborted
    done = sum(float(line.split()[-1]) for line in server._scrape().splitlines()
               if line.startswith("matrixinfer_requests_total{"))
    assert server.metrics()["matrixinfer_requests_aborted_total"] >= N_STREAMS - done, (done, finished)


@pytest.fixture(scope="module")
def colocated(served_checkpoint):
    srv = Server(served_checkpoint, "--kv-cache-memory", str(8 << 20), "--max-num-seqs", "8", api_key=API_KEY)
    yield srv
    srv.stop()


def test_dropped_streams_are_aborted_colocated(colocated):
    _check_drop(colocated, pdc=False)


@pytest.fixture(scope="module")
def pd(served_checkpoint):
    srv = Server(served_checkpoint, "--num-prefill", "1", "--num-decode", "1", "--kv-cache-memory", str(8 << 20),
                 "--max-num-seqs", "8", "--max-num-batched-tokens", "64", api_key=API_KEY)
    yield srv
    srv.stop()


def test_dropped_streams_are_aborted_pd(pd):
    _check_drop(pd, pdc=True)
