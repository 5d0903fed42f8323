"""Per-request measurements and their summary (throughput, latency percentiles, goodput). Pure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client observed for one request. Times are in seconds."""

    prompt_len: int
    output_len: int  # tokens requested (max_tokens)
    success: bool = False
    output_tokens: int = 0  # tokens generated (from usage, else counted chunks)
    ttft: float = 0.0  # send -> first chunk carrying text or tokens
    e2e: float = 0.0  # send -> end of stream
    itls: list[float] = field(default_factory=list)  # gaps between successive content chunks
    start: float = 0.0  # send time, seconds since the benchmark began
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; ``None`` when fewer than two tokens came back."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        """JSON-friendly view, without the (possibly long) inter-token latency list."""
        d = asdict(self)
        del d["itls"]
        d["tpot"] = self.tpot
        return d


@dataclass
class LatencyStats:
    """Mean and percentiles of one latency, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        """Statistics of ``seconds`` (converted to ms); all zeros for an empty list."""
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0, 0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(x) for x in np.percentile(ms, PERCENTILES))
        return cls(float(ms.mean()), p50, p90, p99, len(seconds))


@dataclass
class Summary:
    """The benchmark's headline numbers."""

    duration_s: float
    num_requests: int
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    input_throughput: float  # prompt tokens of completed requests / s
    output_throughput: float  # generated tokens / s
    goodput: float  # completed requests meeting every SLO / s
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    errors: list[str]  # the first few distinct error messages

    def to_dict(self) -> dict:
        """JSON-friendly view."""
        return asdict(self)


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Whether a completed request met the TTFT and TPOT targets (``None`` means no target)."""
    if not record.success:
        return False
    if slo_ttft_ms is not None and record.ttft * 1000.0 > slo_ttft_ms:
        return False
    tpot = record.tpot
    return not (slo_tpot_ms is not None and tpot is not None and tpot * 1000.0 > slo_tpot_ms)


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    max_errors: int = 5,
) -> Summary:
    """Aggregate per-request records of a run that took ``duration_s`` seconds."""
    if duration_s <= 0:
        raise ValueError(f"benchmark duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    errors: list[str] = []
    for r in records:
        if not r.success and r.error not in errors and len(errors) < max_errors:
            errors.append(r.error)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
    return Summary(
        duration_s=duration_s,
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        input_throughput=total_in / duration_s,
        output_throughput=total_out / duration_s,
        goodput=good / duration_s,
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        ttft=LatencyStats.of([r.ttft for r in ok]),
        tpot=LatencyStats.of([t for r in ok if (t := r.tpot) is not None]),
        itl=LatencyStats.of([x for r in ok for x in r.itls]),
        e2e=LatencyStats.of([r.e2e for r in ok]),
        errors=errors,
    )


SPEC_COUNTERS = {"draft_tokens": "matrixinfer_spec_decode_draft_tokens_total",
                 "accepted_tokens": "matrixinfer_spec_decode_accepted_tokens_total",
                 "verifications": "matrixinfer_spec_decode_verifications_total"}


def speculation(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    """Speculative decoding during the run, from the server's /metrics counters scraped before and
    after it: drafts proposed and accepted, the acceptance rate and tokens per sequence per
    speculative step. None when the server did not speculate (or exports no such counters)."""
    d = {k: after.get(name, 0.0) - before.get(name, 0.0) for k, name in SPEC_COUNTERS.items()}
    if d["draft_tokens"] <= 0 or d["verifications"] <= 0:
        return None
    return {"draft_tokens": d["draft_tokens"], "accepted_tokens": d["accepted_tokens"],
            "acceptance_rate": d["accepted_tokens"] / d["draft_tokens"],
            "tokens_per_step": (d["accepted_tokens"] + d["verifications"]) / d["verifications"]}
