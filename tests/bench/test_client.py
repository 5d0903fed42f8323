"""The HTTP driver against a fake streaming server: timings, token counts, concurrency, failures."""

from __future__ import annotations

import asyncio

import pytest

from matrixinfer.bench.client import DONE, BenchConfig, chunk_tokens, parse_sse_line, resolve_model, run_benchmark
from matrixinfer.bench.datasets import LengthRange, RequestSpec, random_dataset
from matrixinfer.bench.metrics import summarize
from tests.bench.fake_server import FakeServer


def test_parse_sse_line() -> None:
    assert parse_sse_line('data: {"choices": []}') == {"choices": []}
    assert parse_sse_line("data:[DONE]") == DONE
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    with pytest.raises(ValueError, match="JSON object"):
        parse_sse_line("data: [1, 2]")


def test_chunk_tokens_counts_text_deltas_and_token_ids() -> None:
    assert chunk_tokens({"choices": [{"text": "hi"}]}) == 1
    assert chunk_tokens({"choices": [{"text": ""}]}) == 0
    assert chunk_tokens({"choices": [{"delta": {"content": "x"}}]}) == 1
    assert chunk_tokens({"choices": [{"text": "ab", "token_ids": [5, 6]}]}) == 2
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 9}}) == 0


def bench(server: FakeServer, specs: list[RequestSpec], **kw) -> tuple[list, float]:
    config = BenchConfig(base_url=server.base_url, model=server.model, show_progress=False, **kw)
    return asyncio.run(run_benchmark(specs, config))


def test_timings_and_token_counts_match_the_server() -> None:
    specs = random_dataset(8, LengthRange(5, 30), LengthRange(10, 10), vocab_size=500, seed=0)
    with FakeServer(ttft_s=0.05, itl_s=0.01, api_key="secret") as server:
        records, duration = bench(server, specs, api_key="secret")
    assert all(r.success for r in records), [r.error for r in records]
    for r in records:
        assert r.output_tokens == 10 and len(r.itls) == 9
        assert 0.045 <= r.ttft <= 0.25, r.ttft
        assert 0.009 <= r.tpot <= 0.04, r.tpot
        assert r.e2e == pytest.approx(r.ttft + sum(r.itls), abs=0.02)
    assert sorted(b["prompt"] for b in server.bodies) == sorted(s.prompt_ids for s in specs)
    body = server.bodies[0]
    assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == 10
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    assert set(server.auth_headers) == {"Bearer secret"}
    s = summarize(records, duration)
    assert s.total_output_tokens == 80 and s.total_input_tokens == sum(sp.prompt_len for sp in specs)
    assert 50 <= s.ttft.p50 <= 250 and s.completed == 8


def test_max_concurrency_caps_requests_in_flight() -> None:
    specs = [RequestSpec([11, 12, 13], 3) for _ in range(12)]
    with FakeServer(ttft_s=0.03, itl_s=0.01) as server:
        records, _ = bench(server, specs, max_concurrency=3)
    assert all(r.success for r in records)
    assert server.peak_in_flight == 3


def test_request_rate_spreads_arrivals() -> None:
    specs = [RequestSpec([11, 12], 2) for _ in range(10)]
    with FakeServer(ttft_s=0.01, itl_s=0.005) as server:
        records, duration = bench(server, specs, request_rate=20.0, seed=1)
    starts = sorted(r.start for r in records)
    assert starts[0] < 0.05 and 0.15 < starts[-1] < 2.0  # ~0.45 s expected for 9 gaps at 20/s
    assert duration > starts[-1]


def test_failures_are_counted_with_their_messages() -> None:
    specs = [RequestSpec(list(range(10, 10 + n)), 2) for n in (5, 40, 6, 50)]
    with FakeServer(ttft_s=0.01, itl_s=0.005, max_prompt_len=20) as server:
        records, duration = bench(server, specs)
    s = summarize(records, duration)
    assert (s.completed, s.failed) == (2, 2)
    assert len(s.errors) == 2 and all(e.startswith("HTTP 400: prompt has") for e in s.errors)


def test_unreachable_server_fails_every_request() -> None:
    config = BenchConfig(base_url="http://127.0.0.1:9", model="m", show_progress=False, timeout_s=2)
    records, _ = asyncio.run(run_benchmark([RequestSpec([11], 1)] * 2, config))
    assert not any(r.success for r in records) and "ConnectError" in records[0].error


def test_resolve_model_reads_models_endpoint_and_falls_back() -> None:
    with FakeServer(vocab_size=321) as server:
        assert asyncio.run(resolve_model(BenchConfig(base_url=server.base_url), None)) == ("fake-model", 321)
        assert asyncio.run(resolve_model(BenchConfig(base_url=server.base_url), 77)) == ("fake-model", 77)
    assert asyncio.run(resolve_model(BenchConfig(base_url="http://127.0.0.1:9", model="m"), None)) == ("m", 1000)
    with pytest.raises(RuntimeError, match="/v1/models"):
        asyncio.run(resolve_model(BenchConfig(base_url="http://127.0.0.1:9"), None))
