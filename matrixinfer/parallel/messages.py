"""Typed messages of DP attention's control channel (msgspec, never pickle): rank 0's plan for
each step and every rank's report after it. In the prefill/decode roles the channel also carries
the KV handoff between rank 0 (which faces the router and holds the instance's KV port) and the
rank that owns a request: :class:`KVHandoff` in a prefill rank's report, :class:`RankAttach` in a
decode instance's plan."""

from __future__ import annotations

import msgspec

from matrixinfer.engine.commands import AddRequest
from matrixinfer.engine.outputs import EngineStats, RequestOutput


class RankAdd(msgspec.Struct, tag=True):
    """A request rank 0 gives to rank ``rank``'s scheduler. ``handoff``: a prefill instance's
    request, which leaves that rank after its first token as a :class:`KVHandoff`."""

    rank: int
    request: AddRequest
    handoff: bool = False


class KVHandoff(msgspec.Struct, tag=True):
    """A request prefilled on a rank other than 0, handed back with its prompt's KV (``kv``: the
    raw bytes of a ``[layers, tokens, dim]`` tensor of ``dtype``) for rank 0 to send to the decode
    instance; the other fields are those of the KV port's ``KVDone``."""

    request_id: str
    first_token: int
    first_logprob: float | None
    num_cached: int
    sampler_state: bytes
    hidden: bytes
    dtype: str
    shape: list[int]
    kv: bytes
    first_top_logprobs: list[tuple[int, float]] = msgspec.field(default_factory=list)


class RankAttach(msgspec.Struct, tag=True):
    """A decode instance's request whose KV arrived on rank 0, moved to rank ``rank``: that rank
    reserves blocks, writes ``kv`` (as in :class:`KVHandoff`) into them and continues the
    sequence after ``first_token`` (which rank 0 already streamed)."""

    rank: int
    request: AddRequest
    first_token: int
    first_logprob: float | None
    num_cached: int
    sampler_state: bytes
    hidden: bytes
    dtype: str
    shape: list[int]
    kv: bytes


class StepPlan(msgspec.Struct, tag=True):
    """Broadcast by rank 0 before every step. ``run``: every rank takes part in a forward pass
    (with its own batch, possibly empty); otherwise the step is a heartbeat. ``stop``: shut down.
    ``placements``: switch to these expert placements (``[moe_layer][rank]``: the experts in that
    rank's slots) before this step, moving expert weights between the ranks (a live rebalance)."""

    adds: list[RankAdd] = msgspec.field(default_factory=list)
    attaches: list[RankAttach] = msgspec.field(default_factory=list)
    aborts: list[str] = msgspec.field(default_factory=list)
    run: bool = False
    stop: bool = False
    placements: list[list[list[int]]] | None = None


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
        rebalances / experts_received: placement switches it took part in / expert copies it
            received in them.
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
    rebalances: int = 0
    experts_received: int = 0


class RankReport(msgspec.Struct, tag=True):
    """Sent to rank 0 after every step."""

    outputs: list[RequestOutput]
    stats: EngineStats
    has_work: bool
    ep: EPMetrics
    handoffs: list[KVHandoff] = msgspec.field(default_factory=list)


class RankConnector(msgspec.Struct):
    """What a rank >= 1 builds its own EMS connector from (rank 0's worker knows the pool): the
    EMS servers (or the controller that lists them), the context cache's hash namespace, what it
    stores (``prompt``: a prefill instance, which also reads; ``generated``: a decode instance with
    ``--store-decode-kv``) and the block size. The launcher passes it as JSON in the rank's
    environment (:data:`CONNECTOR_ENV`); the deployment secret goes separately, also in the
    environment (never argv)."""

    servers: list[str]
    controller: str
    namespace: str
    store: str
    block_size: int


CONNECTOR_ENV = "MATRIXINFER_EP_CONNECTOR"
ENCODER = msgspec.msgpack.Encoder()
PLAN_DECODER = msgspec.msgpack.Decoder(StepPlan)
REPORT_DECODER = msgspec.msgpack.Decoder(RankReport)
