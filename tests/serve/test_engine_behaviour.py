"""Engine behaviour through the server: batching invariance, prefix caching, no leaks under churn."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
import torch

from tests.checkpoints import load_reference
from tests.serve.helpers import API_KEY, HEADERS, Server, stream_tokens, wait_idle


def test_batching_invariance(server, served_checkpoint):
    """16 concurrent greedy requests of different lengths == transformers' greedy generate of each alone."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 90, (16,), generator=g)]

    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[stream_tokens(client, server.url, {
                "model": "tiny", "prompt": p, "max_tokens": 20, "temperature": 0}) for p in prompts])

    results = asyncio.run(go())
    ref = load_reference(served_checkpoint)
    for p, (ids, _) in zip(prompts, results):
        with torch.no_grad():
            expect = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=257,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert ids == expect


def test_prefix_cache_hit_gives_same_output(server):
    prompt = list(range(10, 10 + 100))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    before = server.metrics()["matrixinfer_prefix_cache_hit_tokens_total"]
    cold = httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=60).json()
    warm = httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=60).json()
    assert cold["choices"][0]["text"] == warm["choices"][0]["text"]
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 96  # 6 full blocks of 16
    assert server.metrics()["matrixinfer_prefix_cache_hit_tokens_total"] - before >= 96


@pytest.fixture(scope="module")
def small_server(served_checkpoint):
    # 24 blocks x 16 tokens: far fewer than 32 concurrent requests need, so preemption happens
    srv = Server(served_checkpoint, "--kv-cache-memory", str(24 * 3 * 16 * 40 * 4), "--max-num-seqs", "32",
                 api_key=API_KEY)
    yield srv
    srv.stop()


def test_no_leak_under_preemption_and_disconnects(small_server):
    rng = random.Random(0)
    jobs = []
    for _ in range(200):
        n_prompt, n_out = rng.randint(5, 80), rng.randint(4, 40)
        prompt = [rng.randint(3, 255) for _ in range(n_prompt)]
        drop = rng.randint(1, n_out - 1) if rng.random() < 0.3 else None
        jobs.append((prompt, n_out, drop))

    async def go():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=40)) as client:
            async def one(prompt, n_out, drop):
                async with sem:
                    return await stream_tokens(client, small_server.url, {
                        "model": "tiny", "prompt": prompt, "max_tokens": n_out, "temperature": 0.7,
                        "seed": 1, "ignore_eos": True}, stop_after=drop)
            return await asyncio.gather(*[one(*j) for j in jobs])

    results = asyncio.run(go())
    for (_, n_out, drop), (ids, reason) in zip(jobs, results):
        if drop is None:
            assert reason == "length" and len(ids) == n_out  # completed, nothing lost or duplicated
    m = wait_idle(small_server)
    assert m["matrixinfer_kv_cache_blocks_total"] == 24
    assert m["matrixinfer_kv_cache_blocks_used"] == 0
    assert m["matrixinfer_requests_running"] == 0 and m["matrixinfer_requests_waiting"] == 0
    assert m["matrixinfer_preemptions_total"] > 0
