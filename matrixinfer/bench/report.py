"""Benchmark output: a text table for people and a JSON document for scripts."""

from __future__ import annotations

import json
import os
from typing import Any

from matrixinfer.bench.metrics import LatencyStats, RequestRecord, Summary

WIDTH = 60


def _row(label: str, value: str) -> str:
    return f"{label:<40}{value:>{WIDTH - 40}}"


def _latency_rows(name: str, stats: LatencyStats) -> list[str]:
    rows = [f"{f' {name} ':-^{WIDTH}}"]
    rows.append(_row(f"Mean {name} (ms):", f"{stats.mean:.2f}"))
    for p in ("p50", "p90", "p99"):
        rows.append(_row(f"P{p[1:]} {name} (ms):", f"{getattr(stats, p):.2f}"))
    return rows


def _slo_text(summary: Summary) -> str:
    parts = []
    if summary.slo_ttft_ms is not None:
        parts.append(f"TTFT<={summary.slo_ttft_ms:g}ms")
    if summary.slo_tpot_ms is not None:
        parts.append(f"TPOT<={summary.slo_tpot_ms:g}ms")
    return ", ".join(parts) or "no SLO"


def format_table(summary: Summary, title: str = "Serving Benchmark Result",
                 speculation: dict[str, float] | None = None) -> str:
    """The summary as a fixed-width text table (like ``vllm bench serve``'s), with the server's
    speculative decoding figures when it speculated (:func:`matrixinfer.bench.metrics.speculation`)."""
    rows = [f"{f' {title} ':=^{WIDTH}}"]
    rows.append(_row("Successful requests:", str(summary.completed)))
    rows.append(_row("Failed requests:", str(summary.failed)))
    rows.append(_row("Benchmark duration (s):", f"{summary.duration_s:.2f}"))
    rows.append(_row("Total input tokens:", str(summary.total_input_tokens)))
    rows.append(_row("Total generated tokens:", str(summary.total_output_tokens)))
    rows.append(_row("Request throughput (req/s):", f"{summary.request_throughput:.2f}"))
    rows.append(_row(f"Goodput (req/s, {_slo_text(summary)}):", f"{summary.goodput:.2f}"))
    rows.append(_row("Input token throughput (tok/s):", f"{summary.input_throughput:.2f}"))
    rows.append(_row("Output token throughput (tok/s):", f"{summary.output_throughput:.2f}"))
    total = summary.input_throughput + summary.output_throughput
    rows.append(_row("Total token throughput (tok/s):", f"{total:.2f}"))
    rows += _latency_rows("TTFT", summary.ttft)
    rows += _latency_rows("TPOT", summary.tpot)
    rows += _latency_rows("ITL", summary.itl)
    rows += _latency_rows("E2E", summary.e2e)
    if speculation is not None:
        rows.append(f"{' Speculative decoding ':-^{WIDTH}}")
        rows.append(_row("Draft tokens proposed:", f"{speculation['draft_tokens']:.0f}"))
        rows.append(_row("Draft tokens accepted:", f"{speculation['accepted_tokens']:.0f}"))
        rows.append(_row("Acceptance rate:", f"{speculation['acceptance_rate']:.3f}"))
        rows.append(_row("Tokens per speculative step:", f"{speculation['tokens_per_step']:.2f}"))
    if summary.errors:
        rows.append(f"{' Errors (first distinct) ':-^{WIDTH}}")
        rows += [f"- {e}" for e in summary.errors]
    rows.append("=" * WIDTH)
    return "\n".join(rows)


def result_document(summary: Summary, config: dict[str, Any], records: list[RequestRecord]) -> dict[str, Any]:
    """The JSON result: the run's settings, the summary and one entry per request."""
    return {"config": config, "summary": summary.to_dict(), "requests": [r.to_dict() for r in records]}


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` (creating parent directories); ``inf`` is written as a string."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(document), f, indent=2)
        f.write("\n")


def _finite(value: Any) -> Any:
    """Replace non-finite floats (e.g. an infinite request rate) so the file is strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
