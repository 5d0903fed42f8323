"""Metrics: TPOT, percentiles, throughput and goodput from per-request records."""

from __future__ import annotations

import pytest

from matrixinfer.bench.metrics import LatencyStats, RequestRecord, meets_slo, summarize


def rec(ttft: float, e2e: float, out: int, prompt: int = 10, ok: bool = True, error: str = "") -> RequestRecord:
    return RequestRecord(prompt, out, success=ok, output_tokens=out if ok else 0, ttft=ttft, e2e=e2e, error=error)


def test_tpot_excludes_first_token() -> None:
    assert rec(0.1, 1.1, 11).tpot == pytest.approx(0.1)
    assert rec(0.1, 0.1, 1).tpot is None
    assert rec(0.1, 1.0, 5, ok=False).tpot is None


def test_latency_stats_percentiles_in_ms() -> None:
    stats = LatencyStats.of([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats.mean == pytest.approx(50.5)
    assert stats.p50 == pytest.approx(50.5) and stats.p90 == pytest.approx(90.1) and stats.p99 == pytest.approx(99.01)
    assert LatencyStats.of([]).count == 0


def test_summary_throughput_goodput_and_errors() -> None:
    records = [
        rec(0.1, 1.1, 11, prompt=100),  # tpot 100 ms
        rec(0.5, 1.5, 11, prompt=200),  # ttft 500 ms, tpot 100 ms
        rec(0.1, 2.1, 11, prompt=300),  # tpot 200 ms
        rec(0, 0, 5, ok=False, error="HTTP 400: too long"),
        rec(0, 0, 5, ok=False, error="HTTP 400: too long"),
        rec(0, 0, 5, ok=False, error="ReadTimeout"),
    ]
    s = summarize(records, duration_s=2.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert (s.num_requests, s.completed, s.failed) == (6, 3, 3)
    assert s.request_throughput == pytest.approx(1.5)
    assert s.input_throughput == pytest.approx(300) and s.output_throughput == pytest.approx(16.5)
    assert s.goodput == pytest.approx(0.5)  # only the first meets both SLOs
    assert s.errors == ["HTTP 400: too long", "ReadTimeout"]
    assert s.ttft.mean == pytest.approx(233.333, rel=1e-3) and s.tpot.count == 3
    assert summarize(records, 2.0).goodput == pytest.approx(1.5)  # no SLO: every completed request counts
    assert meets_slo(rec(0.1, 0.1, 1), slo_ttft_ms=200, slo_tpot_ms=1)  # single token: no TPOT to judge


def test_summary_needs_positive_duration() -> None:
    with pytest.raises(ValueError, match="duration"):
        summarize([], 0.0)


def test_speculation_from_metric_deltas_and_in_the_table() -> None:
    from matrixinfer.bench.metrics import speculation
    from matrixinfer.bench.report import format_table

    before = {"matrixinfer_spec_decode_draft_tokens_total": 100.0,
              "matrixinfer_spec_decode_accepted_tokens_total": 60.0,
              "matrixinfer_spec_decode_verifications_total": 100.0}
    after = {"matrixinfer_spec_decode_draft_tokens_total": 300.0,
             "matrixinfer_spec_decode_accepted_tokens_total": 190.0,
             "matrixinfer_spec_decode_verifications_total": 300.0}
    spec = speculation(before, after)
    assert spec == {"draft_tokens": 200.0, "accepted_tokens": 130.0, "acceptance_rate": 0.65, "tokens_per_step": 1.65}
    assert speculation(before, before) is None and speculation({}, {}) is None
    records = [rec(0.1, 0.2, 3)]
    table = format_table(summarize(records, 1.0, None, None), speculation=spec)
    assert "Acceptance rate:" in table and "0.650" in table and "1.65" in table
    assert "Acceptance rate:" not in format_table(summarize(records, 1.0, None, None))
