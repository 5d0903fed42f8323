"""Peer-to-peer PDC serving with real processes on loopback: router + prefill + decode + EMS."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from tests.serve.helpers import (
    API_KEY,
    HEADERS,
    SCHEMA_FORMAT,
    Server,
    check_top_logprobs,
    child_restarts,
    matches_schema,
    stream_chat,
    stream_tokens,
)


@pytest.fixture(scope="module")
def pdc(served_checkpoint):
    srv = Server(served_checkpoint, "--num-prefill", "2", "--num-decode", "1", "--num-ems", "2",
                 "--kv-cache-memory", str(8 << 20), "--max-num-batched-tokens", "64",
                 "--reserve-timeout", "10", "--ems-capacity", "64M", "--store-decode-kv", api_key=API_KEY)
    yield srv
    srv.stop()


def _complete(server, prompt, n=12, **kw):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, **kw}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = server.instance_metrics()
        busy = sum(m.get("kv_used", {}).values()) + sum(m.get("reserved_blocks", {}).values()) \
            + sum(m.get("running", {}).values()) + sum(m.get("waiting", {}).values())
        if busy == 0:
            return m
        time.sleep(0.25)
    raise AssertionError(f"instances did not go idle: {server.instance_metrics()}")


def test_pd_matches_colocated_engine(pdc, served_checkpoint):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist() for n in (7, 23, 40, 70, 5, 33)]

    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[stream_tokens(client, pdc.url, {
                "model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0}) for p in prompts])

    got = [ids for ids, _ in asyncio.run(go())]
    engine = LLMEngine(EngineConfig(model=str(served_checkpoint), device="cpu", dtype="float32",
                                    kv_cache_memory=8 << 20))
    expect = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    assert got == expect
    _wait_idle(pdc)
    deadline = time.time() + 5  # the transfer counters arrive with the instances' next load reports
    while time.time() < deadline:
        m = pdc.instance_metrics()
        if sum(m["kv_sent_bytes"].values()) > 0 and sum(m["kv_received_bytes"].values()) > 0:
            break
        time.sleep(0.1)
    assert sum(m["kv_sent_bytes"].values()) > 0 and sum(m["kv_received_bytes"].values()) > 0


def _settled(server) -> dict[str, dict[str, float]]:
    """Per-instance metrics once the load reports (every 0.2 s) have caught up."""
    time.sleep(0.6)
    return server.instance_metrics()


def test_pd_structured_output_and_top_logprobs(pdc, served_checkpoint):
    """Issue 18: the first token is sampled on a prefill instance and the rest on the decode instance,
    which rebuilds the grammar's state from the tokens so far; the first token's alternatives travel
    in the KV handoff. About 3 s."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
    for seed in (0, 3):
        _, text, reason, _ = stream_chat(pdc.url, {**chat, "response_format": SCHEMA_FORMAT, "temperature": 1,
                                                   "seed": seed, "max_tokens": 200})
        assert reason == "stop" and matches_schema(text), text
    r = httpx.post(f"{pdc.url}/v1/chat/completions", json={**chat, "response_format": SCHEMA_FORMAT,
                                                           "max_tokens": 200}, headers=HEADERS, timeout=120)
    assert r.status_code == 200 and matches_schema(r.json()["choices"][0]["message"]["content"]), r.text
    prompt = httpx.post(f"{pdc.url}/tokenize", json=chat, headers=HEADERS).json()["tokens"]
    ids, _, _, entries = stream_chat(pdc.url, {**chat, "max_tokens": 6, "temperature": 0, "logprobs": True,
                                               "top_logprobs": 5})
    check_top_logprobs(served_checkpoint, prompt, ids, entries, 5)


def test_prefix_stored_by_one_prefill_instance_is_hit_by_the_other(pdc):
    prompt = [(7 * i) % 250 + 3 for i in range(100)]  # 6 full blocks of 16
    stored0 = sum(_settled(pdc)["ems_stored_blocks"].values())
    first = _complete(pdc, prompt)
    deadline = time.time() + 10  # the blocks are stored asynchronously
    while sum(pdc.instance_metrics()["ems_stored_blocks"].values()) < stored0 + 6 and time.time() < deadline:
        time.sleep(0.1)
    before = _settled(pdc)
    second = _complete(pdc, prompt)
    after = _settled(pdc)
    grew = {i for i in after["prompt_tokens"] if after["prompt_tokens"][i] > before["prompt_tokens"].get(i, 0)}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    (second_instance,) = grew  # the router alternates equally loaded instances: not the first one
    assert after["external_hit_tokens"][second_instance] - before["external_hit_tokens"][second_instance] == 96
    assert after["prefix_hit_tokens"][second_instance] == before["prefix_hit_tokens"][second_instance]
    _wait_idle(pdc)


def test_generated_kv_stored_by_decode_is_hit_by_a_follow_up(pdc):
    """--store-decode-kv: the decode instance stores the blocks it generates, so a follow-up whose
    prompt is the first prompt plus its output (a next chat turn) hits them in EMS."""
    prompt = [(11 * i) % 250 + 3 for i in range(20)]  # one full prompt block of 16

    async def first():
        async with httpx.AsyncClient(timeout=120) as client:
            return await stream_tokens(client, pdc.url, {"model": "tiny", "prompt": prompt, "max_tokens": 40,
                                                          "temperature": 0, "ignore_eos": True})

    before = _settled(pdc)
    decode = next(i for i in before["running"] if "decode" in i)
    out, _ = asyncio.run(first())
    assert len(out) == 40
    want = before["ems_stored_blocks"].get(decode, 0) + 2  # blocks 1 and 2 (tokens 16-47), asynchronously
    deadline = time.time() + 10
    while pdc.instance_metrics()["ems_stored_blocks"].get(decode, 0) < want and time.time() < deadline:
        time.sleep(0.1)
    assert pdc.instance_metrics()["ems_stored_blocks"][decode] == want
    follow_up = _complete(pdc, prompt + out)  # 60 tokens: 3 full blocks are cached
    assert follow_up["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    _wait_idle(pdc)


def test_client_disconnect_frees_blocks_on_both_sides(pdc):
    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[stream_tokens(client, pdc.url, {
                "model": "tiny", "prompt": [3 + k] * 90, "max_tokens": 300, "temperature": 0, "ignore_eos": True},
                stop_after=3) for k in range(4)])

    assert all(reason == "disconnected" for _, reason in asyncio.run(go()))
    _wait_idle(pdc)


def test_prefix_cache_metrics_add_up(pdc):
    """Issue 18 (defect 3): the deployment's hit rate is hits (local or EMS) over tokens looked up,
    summed over the instances (it read 52736.0 with the queried tokens stuck at 0). Runs before the
    tests that kill instances: a lost instance's counters leave the deployment's sums."""
    def counts():
        m = pdc.metrics()
        return (m["matrixinfer_prefix_cache_queried_tokens_total"],
                m["matrixinfer_prefix_cache_hit_tokens_total"] + m["matrixinfer_external_cache_hit_tokens_total"])

    _wait_idle(pdc)
    q0, h0 = counts()  # the earlier tests' counters, once every instance has reported them (every 0.2 s)
    for _ in range(20):
        time.sleep(0.5)
        if counts() == (q0, h0):
            break
        q0, h0 = counts()
    prompt = [(17 * i + 5) % 250 + 3 for i in range(70)]  # 4 full blocks to look up; new to every cache
    cached = [_complete(pdc, prompt, n=2)["usage"]["prompt_tokens_details"]["cached_tokens"] for _ in range(3)]
    deadline = time.time() + 5  # instances report every 0.2 s
    while counts() != (q0 + 3 * 64, h0 + sum(cached)) and time.time() < deadline:
        time.sleep(0.1)
    assert cached[0] == 0 and cached[1] == cached[2] == 64
    assert counts() == (q0 + 3 * 64, h0 + 128)
    q, h = counts()
    assert pdc.metrics()["matrixinfer_prefix_cache_hit_rate"] == pytest.approx(h / q)


def test_token_counters_equal_usage(pdc):
    """The deployment's generation token counter grows by what ``usage`` reports (the decode
    instance counted the prefill instance's first token again: +1 per request), and its prompt
    counter (tokens computed) by the prompt tokens not served from a cache."""
    def counts():
        m = pdc.metrics()
        return m["matrixinfer_prompt_tokens_total"], m["matrixinfer_generation_tokens_total"]

    _wait_idle(pdc)
    before = counts()
    for _ in range(20):  # until every instance has reported the earlier tests' counts (every 0.2 s)
        time.sleep(0.5)
        if counts() == before:
            break
        before = counts()
    usages = [_complete(pdc, [(7 * i + k) % 250 + 3 for i in range(20 + k)], n=5 + k)["usage"] for k in range(3)]
    want = (before[0] + sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usages),
            before[1] + sum(u["completion_tokens"] for u in usages))
    deadline = time.time() + 5
    while counts() != want and time.time() < deadline:
        time.sleep(0.1)
    assert counts() == want


def test_killing_an_ems_server_only_lowers_the_hit_rate(pdc):
    os.kill(pdc.child_pid("ems-server", 0), signal.SIGKILL)
    for k in range(4):
        prompt = [(11 * i + k) % 250 + 3 for i in range(50)]
        out = _complete(pdc, prompt, n=6, ignore_eos=True)
        assert out["usage"]["completion_tokens"] == 6
    _wait_idle(pdc)


def test_killing_a_prefill_instance_mid_request_retries_elsewhere(pdc):
    prompts = [[(13 * i + k) % 250 + 3 for i in range(300)] for k in range(6)]

    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(stream_tokens(client, pdc.url, {
                "model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}))
                for p in prompts]
            deadline = time.time() + 10
            while time.time() < deadline:  # both prefill instances hold requests (300 tokens, 64-token chunks)
                m = await asyncio.to_thread(pdc.instance_metrics)
                busy = [k for k, v in m["running"].items() if k.startswith("prefill") and v + m["waiting"][k] > 0]
                if len(busy) == 2:
                    break
                await asyncio.sleep(0.02)
            os.kill(pdc.child_pid("--role prefill", 0), signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    assert all(reason == "length" and len(ids) == 8 for ids, reason in results)
    _wait_restarted(pdc, "prefill0", roles={"prefill": 2, "decode": 1})
    _wait_idle(pdc)


def _wait_restarted(server, child: str, roles: dict[str, int], timeout: float = 90) -> None:
    """Wait until the launcher restarted ``child`` once and the router has ``roles`` instances again."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = server.instance_metrics().get("running", {})
        have = {role: sum(1 for i in running if i.startswith(role)) for role in roles}
        if child_restarts(server).get(child) == 1 and have == roles:
            return
        time.sleep(0.3)
    raise AssertionError(f"{child} not restarted and back: restarts {child_restarts(server)}, "
                         f"instances {server.instance_metrics().get('running')}")


def test_killing_the_decode_instance_fails_cleanly_then_the_launcher_restarts_it(pdc):
    decode = pdc.child_pid("--role decode", 0)

    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            # kill at the decode instance's first token (polling the metrics for a running request
            # first let a fast machine finish all 480 tokens before the kill)
            decoding = asyncio.Event()
            task = asyncio.create_task(stream_tokens(client, pdc.url, {
                "model": "tiny", "prompt": [5] * 20, "max_tokens": 480, "temperature": 0, "ignore_eos": True},
                started=decoding, started_at=2))
            await asyncio.wait_for(decoding.wait(), 30)
            os.kill(decode, signal.SIGKILL)
            return await task

    ids, reason = asyncio.run(go())
    assert reason.startswith("error:") and "decode instance" in reason and len(ids) < 480  # a clean error, no hang
    r = httpx.post(f"{pdc.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   headers=HEADERS, timeout=30)
    assert r.status_code == 503 and "decode" in r.json()["error"]["message"]
    health = httpx.get(f"{pdc.url}/health")  # truthful: nothing can be served without a decode instance
    assert health.status_code == 503 and "no decode instance" in health.json()["error"]
    _wait_restarted(pdc, "decode0", roles={"prefill": 2, "decode": 1})  # backoff, model load, join
    assert httpx.get(f"{pdc.url}/health").status_code == 200
    out = _complete(pdc, [9] * 30, n=5, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 5
    m = _wait_idle(pdc)
    assert all(v == 0 for v in m["kv_used"].values()) and all(v == 0 for v in m["reserved_blocks"].values())
