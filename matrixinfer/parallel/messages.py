"""Typed messages of DP attention's control channel (msgspec, never pickle): rank 0's plan for
each step and every rank's report after it."""

from __future__ import annotations

import msgspec

from matrixinfer.engine.commands import AddRequest
from matrixinfer.engine.outputs import EngineStats, RequestOutput


class RankAdd(msgspec.Struct, tag=True):
    """A request rank 0 gives to rank ``rank``'s scheduler."""

    rank: int
    request: AddRequest


class StepPlan(msgspec.Struct, tag=True):
    """Broadcast by rank 0 before every step. ``run``: every rank takes part in a forward pass
    (with its own batch, possibly empty); otherwise the step is a heartbeat. ``stop``: shut down."""

    adds: list[RankAdd] = msgspec.field(default_factory=list)
    aborts: list[str] = msgspec.field(default_factory=list)
    run: bool = False
    stop: bool = False


class EPMetrics(msgspec.Struct, tag=True, kw_only=True):
    """One rank's expert-parallel counters since it started.

    Attributes:
        rank: the EP rank.
        experts: the routed experts it holds (its row of the placement table).
        tokens: tokens its own batches sent through the MoE layers (one per token per forward pass).
        passes / idle_passes: forward passes it took part in / of them with an empty batch.
        dispatch_bytes / combine_bytes: bytes it sent to other ranks in dispatch / combine.
        dispatch_seconds / combine_seconds: time in dispatch (encode, split sizes, all-to-all) and
            combine (all-to-all, sum).
        expert_tokens: ``[moe_layer][expert]`` tokens of its batches routed to each expert.
    """

    rank: int
    experts: list[int]
    tokens: int = 0
    passes: int = 0
    idle_passes: int = 0
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    dispatch_seconds: float = 0.0
    combine_seconds: float = 0.0
    expert_tokens: list[list[int]] = msgspec.field(default_factory=list)


class RankReport(msgspec.Struct, tag=True):
    """Sent to rank 0 after every step."""

    outputs: list[RequestOutput]
    stats: EngineStats
    has_work: bool
    ep: EPMetrics


ENCODER = msgspec.msgpack.Encoder()
PLAN_DECODER = msgspec.msgpack.Decoder(StepPlan)
REPORT_DECODER = msgspec.msgpack.Decoder(RankReport)
