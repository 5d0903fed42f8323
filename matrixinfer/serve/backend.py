"""What the HTTP API needs from whatever runs the model: the :class:`Backend` protocol.

Two implementations: the colocated :class:`~matrixinfer.engine.async_engine.AsyncEngine` (one
engine on a thread) and the PDC :class:`~matrixinfer.serve.router.Router` (prefill and decode
instances behind a stateless global scheduler). The API server (:mod:`matrixinfer.serve.api_server`)
uses nothing else, so a new deployment shape needs only these members. Torch-free: engine types are
imported for annotations only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from matrixinfer.engine.outputs import EngineStats, RequestOutput
    from matrixinfer.engine.sampling_params import SamplingParams


class PromptTokenizer(Protocol):
    """The tokenizer calls the API server makes (:class:`~matrixinfer.model.tokenizer.Tokenizer` has them)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    suffix: str = "") -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@runtime_checkable
class Backend(Protocol):
    """The serving side of the API server (read-only members may be attributes or properties).

    Attributes:
        model_id: the served model name (the only ``model`` requests may name).
        tokenizer: encodes prompts and chat messages, decodes tokens for logprobs.
        max_model_len: the model's context length, reported by /v1/models.
        max_seq_len: the most tokens (prompt + output) one request may reach; longer requests get 400.
        vocab_size: reported by /v1/models.
        stats: the deployment's current :class:`EngineStats` (one engine's, or the sum over a PDC
            deployment's instances), read at every /metrics scrape.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def tokenizer(self) -> PromptTokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def max_seq_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def stats(self) -> EngineStats: ...

    def health(self) -> str | None:
        """None while a request can be served; otherwise why not (/health answers 503 with it)."""
        ...

    def instance_metrics(self) -> list[tuple[str, str, EngineStats]]:
        """``(instance id, role, stats)`` of each instance behind the backend, exported as the
        per-instance ``matrixinfer_instance_*`` gauges: one entry per prefill and decode worker in a
        PDC deployment, ``[]`` for a single colocated engine (whose figures ``stats`` already gives)."""
        ...

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                 ) -> AsyncIterator[RequestOutput]:
        """Run one request, yielding its outputs up to and including the finished one.

        Raises (from the iterator, before or between outputs) ``RequestError`` for a request the
        model cannot take (HTTP 400) and ``EngineDeadError`` when the backend cannot serve it (503).
        A consumer that stops early (cancelled on client disconnect) aborts the request.
        """
        ...
