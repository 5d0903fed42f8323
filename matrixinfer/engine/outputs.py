"""What an engine reports: per-request outputs and instance statistics (torch-free).

Each concept has one type, used in process and on the wire between PDC processes (msgspec,
no pickle): a decode instance sends the :class:`RequestOutput` its engine produced and its
:class:`EngineStats` as its load report; the router relays the first and sums the second. The
Prometheus gauges and counters are generated from :class:`EngineStats`' fields
(:mod:`matrixinfer.serve.metrics`), so a new statistic needs one line here.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec

from matrixinfer.engine.errors import RequestFailedError


class FinishReason(enum.StrEnum):
    """Why a request stopped (the OpenAI ``finish_reason`` for the first two)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client left or the request was cancelled
    HANDOFF = "handoff"  # prefill role: the sequence continues on a decode instance


class RequestOutput(msgspec.Struct, tag=True, kw_only=True):
    """What one step produced for one request.

    Attributes:
        request_id: the request's id.
        token_ids: tokens produced since the previous output.
        logprobs: their log-probabilities (when the request asked for them).
        top_logprobs: per token, the most likely tokens at its position as (token id,
            log-probability), most likely first (when the request asked for ``top_logprobs``).
        text: newly decodable text (stop strings held back until they cannot match).
        finished / finish_reason: whether the request ended with this output, and why.
        num_prompt_tokens / num_output_tokens / num_cached_tokens: usage so far.
        handed_off: prefill role: the sequence moved to a decode instance after this token.
        error: why processing the request failed inside the engine (then ``finished`` is True and
            the consumer raises :class:`~matrixinfer.engine.errors.RequestFailedError`).
    """

    request_id: str
    token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: list[float] = msgspec.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = msgspec.field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    handed_off: bool = False
    error: str = ""


def _stat(doc: str, metric: str = "", kind: str = "gauge") -> msgspec.Meta:
    """Field metadata: the help text and how the field is exported (``metric`` renames it)."""
    return msgspec.Meta(description=doc, extra={"metric": metric, "kind": kind})


class EngineStats(msgspec.Struct, tag=True, kw_only=True):
    """Counters and gauges of one engine instance (also its load report to the router).

    Counters only grow; gauges are the state at the time of the report. Summing two instances'
    stats field by field gives their deployment's stats (:func:`sum_stats`).
    """

    queued_tokens: Annotated[int, _stat("Tokens waiting to be computed (waiting and running requests)")] = 0
    running: Annotated[int, _stat("Requests in the running batch", "requests_running")] = 0
    waiting: Annotated[int, _stat("Requests waiting to be scheduled", "requests_waiting")] = 0
    kv_total: Annotated[int, _stat("KV blocks in the cache", "kv_cache_blocks_total")] = 0
    kv_used: Annotated[int, _stat("KV blocks in use", "kv_cache_blocks_used")] = 0
    reserved_blocks: Annotated[int, _stat("KV blocks reserved for incoming transfers")] = 0
    prefix_queried_tokens: Annotated[int, _stat("Prompt tokens looked up in the prefix caches (local and EMS)",
                                                "prefix_cache_queried_tokens", "counter")] = 0
    prefix_hit_tokens: Annotated[int, _stat("Prompt tokens served from the local prefix cache",
                                            "prefix_cache_hit_tokens", "counter")] = 0
    external_hit_tokens: Annotated[int, _stat("Prompt tokens loaded from the EMS context cache",
                                              "external_cache_hit_tokens", "counter")] = 0
    prompt_tokens: Annotated[int, _stat("Prompt tokens computed", kind="counter")] = 0
    generation_tokens: Annotated[int, _stat("Tokens generated", kind="counter")] = 0
    preemptions: Annotated[int, _stat("Sequences preempted for lack of KV blocks", kind="counter")] = 0
    steps: Annotated[int, _stat("Engine steps run", "engine_steps", "counter")] = 0
    busy_seconds: Annotated[float, _stat("Seconds the engine spent in steps (its rate is the busy share; over "
                                         "engine_steps, the mean step time)", "engine_busy_seconds",
                                         "counter")] = 0.0
    busy_cpu_seconds: Annotated[float, _stat("CPU seconds of the engine's thread in steps (below busy_seconds by the "
                                             "time the thread waited in steps: for the interpreter lock, or for a "
                                             "core)", "engine_busy_cpu_seconds", "counter")] = 0.0
    kv_sent_bytes: Annotated[int, _stat("KV bytes sent to decode instances", kind="counter")] = 0
    kv_received_bytes: Annotated[int, _stat("KV bytes received from prefill instances", kind="counter")] = 0
    kv_transfer_seconds: Annotated[float, _stat("Seconds spent sending KV", kind="counter")] = 0.0
    kv_transfers: Annotated[int, _stat("KV transfers completed", kind="counter")] = 0
    ems_stored_blocks: Annotated[int, _stat("KV blocks stored to the EMS context cache", kind="counter")] = 0
    ems_loaded_blocks: Annotated[int, _stat("KV blocks loaded from the EMS context cache", kind="counter")] = 0
    ep_remote_requests: Annotated[int, _stat("Requests an expert-parallel instance's rank 0 gave to its other ranks' "
                                             "schedulers (DP attention)", kind="counter")] = 0
    spec_steps: Annotated[int, _stat("Engine steps that verified speculative drafts", "spec_decode_steps",
                                     "counter")] = 0
    spec_verifications: Annotated[int, _stat("Sequences verified in speculative steps (one per sequence per step)",
                                             "spec_decode_verifications", "counter")] = 0
    spec_draft_tokens: Annotated[int, _stat("Draft tokens proposed by speculative decoding",
                                            "spec_decode_draft_tokens", "counter")] = 0
    spec_accepted_tokens: Annotated[int, _stat("Draft tokens accepted by verification",
                                               "spec_decode_accepted_tokens", "counter")] = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return self.kv_used / max(self.kv_total, 1)

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from a prefix cache (local or EMS) per token looked up."""
        return (self.prefix_hit_tokens + self.external_hit_tokens) / max(self.prefix_queried_tokens, 1)

    @property
    def spec_acceptance_rate(self) -> float:
        """Draft tokens accepted per draft token proposed (0 without speculation)."""
        return self.spec_accepted_tokens / max(self.spec_draft_tokens, 1)

    @property
    def spec_tokens_per_step(self) -> float:
        """Tokens a sequence gained per speculative step: accepted drafts plus the verified token
        (0 without speculation; 1.7 is the reference design's one draft at 70% acceptance)."""
        v = self.spec_verifications
        return (self.spec_accepted_tokens + v) / v if v else 0.0


def sum_stats(stats: list[EngineStats]) -> EngineStats:
    """Field-by-field sum (a deployment's totals from its instances' reports)."""
    names = EngineStats.__struct_fields__
    return EngineStats(**{n: sum(getattr(s, n) for s in stats) for n in names})


async def drain(q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
    """A request's outputs from ``q`` up to and including the finished one; an exception put in
    the queue is raised, and so is an output that reports a failure (RequestFailedError)."""
    while True:
        item = await q.get()
        if isinstance(item, BaseException):
            raise item
        if item.error:
            raise RequestFailedError(item.error)
        yield item
        if item.finished:
            return
