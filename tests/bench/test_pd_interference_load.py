"""benchmarks/pd_interference.py drives its long prefills open loop (issue 18, defect 10): one every
1 / rate seconds whether or not earlier ones finished, so P/D and colocated face the same load. The
closed loop it replaced sent the next prefill only when the last one had finished, so a slow
server got fewer (here: 1 instead of about 6)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import httpx

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pd_interference.py"


def _load():
    spec = importlib.util.spec_from_file_location("pd_interference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefills_are_sent_at_the_rate_however_slow_the_server():
    bench = _load()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2.0)  # every prefill takes longer than the whole window
        return httpx.Response(200, json={"choices": [{"text": "x"}]})

    async def go() -> tuple[int, int]:
        stop, finished = asyncio.Event(), []
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow), base_url="http://test") as client:
            load = asyncio.create_task(bench.prefill_load(client, "http://test", "m", [[1, 2, 3]], 10.0, stop,
                                                          finished))
            await asyncio.sleep(0.55)
            stop.set()
            tasks = await load
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks), len(finished)

    sent, done = asyncio.run(go())
    assert 5 <= sent <= 7 and done == 0  # 10/s over 0.55 s, none finished: open loop
