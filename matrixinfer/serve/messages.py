"""Typed messages between the router and prefill/decode workers, and between workers (KV).

Serialized with msgspec (msgpack), never pickle; tensors travel as raw bytes after a header that
gives their dtype and shape (see :mod:`matrixinfer.netio`). Requests, outputs and load reports
use the engine's own types (:class:`SamplingParams`, :class:`RequestOutput`, :class:`EngineStats`),
so nothing is copied field by field between the engine and the wire.
"""

from __future__ import annotations

import msgspec

from matrixinfer.engine.commands import Abort
from matrixinfer.engine.outputs import EngineStats, RequestOutput
from matrixinfer.engine.sampling_params import SamplingParams


# -- worker -> router ----------------------------------------------------------------------------
class Join(msgspec.Struct, tag=True):
    """First message of a worker: who it is (the router answers with Welcome)."""

    role: str
    instance_id: str


class Register(msgspec.Struct, tag=True):
    """A worker joins: its role, the address where its KV receiver listens (decode), its model."""

    role: str
    instance_id: str
    model_id: str
    kv_addr: str
    max_model_len: int
    max_seq_len: int
    vocab_size: int
    num_blocks: int
    block_size: int


class Reserved(msgspec.Struct, tag=True):
    """Decode reply to Reserve: blocks are held (ok) or the request failed (error)."""

    request_id: str
    ok: bool
    error: str = ""


class Failed(msgspec.Struct, tag=True):
    """A request failed inside a worker (bad input, transfer failure); ``param``: the request field
    a 400 names, when it is not the prompt."""

    request_id: str
    error: str
    status: int = 500
    param: str | None = None


# -- router -> worker ----------------------------------------------------------------------------
class Welcome(msgspec.Struct, tag=True):
    """The router's answer to Join: the model it serves and where the EMS pool's controller is."""

    model_id: str
    model_path: str
    ems_controller: str


class Prefill(msgspec.Struct, tag=True):
    """Compute the prompt and the first token, then send the KV to ``decode_addr``."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    decode_addr: str


class Reserve(msgspec.Struct, tag=True):
    """Hold blocks for a prompt's KV (decode instance), reclaimed after ``timeout`` seconds."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    timeout: float


# -- prefill worker -> decode worker (KV plane) ----------------------------------------------------
class KVChunk(msgspec.Struct, tag=True):
    """Latents of layers ``[layer_start, layer_end)`` for all of a request's prompt tokens:
    ``nbytes`` raw bytes of ``dtype`` with shape ``[layers, num_tokens, dim]`` follow."""

    request_id: str
    layer_start: int
    layer_end: int
    num_tokens: int
    dim: int
    dtype: str
    nbytes: int


class KVDone(msgspec.Struct, tag=True):
    """All chunks sent: the decode instance may start the sequence with ``first_token``.
    ``hidden``: the main model's float32 hidden state at the last prompt position (with MTP
    speculation, what the decode instance drafts the next tokens from; empty otherwise).
    ``first_top_logprobs``: the first token's most likely alternatives (token id, log-probability),
    when the request asked for ``top_logprobs``. A structured-output grammar's state does not
    travel: the decode instance rebuilds it from ``first_token``."""

    request_id: str
    first_token: int
    first_logprob: float | None
    num_cached: int
    sampler_state: bytes = b""
    hidden: bytes = b""
    first_top_logprobs: list[tuple[int, float]] = msgspec.field(default_factory=list)


WorkerToRouter = Join | Register | EngineStats | RequestOutput | Reserved | Failed
RouterToWorker = Welcome | Prefill | Reserve | Abort
KVMessage = KVChunk | KVDone

__all__ = ["Abort", "Failed", "Join", "KVChunk", "KVDone", "KVMessage", "Prefill", "Register", "Reserve",
           "Reserved", "RouterToWorker", "Welcome", "WorkerToRouter"]
