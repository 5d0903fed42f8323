"""A request's state inside the engine (vLLM's ``Sequence``)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from matrixinfer.engine.outputs import FinishReason
from matrixinfer.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Prompt, generated tokens and KV bookkeeping of one request (n=1).

    ``num_computed`` counts tokens whose latents are in the KV cache; a preempted sequence drops
    its blocks and recomputes prompt plus generated tokens when it runs again.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # params.top_logprobs > 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_committed: int = 0  # leading full blocks already offered to the prefix cache
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # MTP speculation (engine/speculative.py): the main model's hidden states of the mtp_count
    # positions from mtp_start (up to num_computed) whose MTP rows are not computed yet, as
    # (tensor, first row, end row) ranges
    mtp_start: int = 0
    mtp_count: int = 0
    mtp_pending: list[tuple[torch.Tensor, int, int]] = field(default_factory=list)
    # the next step's first drafts (depth 1, 2, ...) and the MTP states they came from, when the
    # verification step drafted ahead (engine/speculative.py); cleared whenever the pending states change
    mtp_draft: list[tuple[int, torch.Tensor]] | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, n: int) -> list[int]:
        """``all_ids[start:start + n]`` without concatenating the whole sequence."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_ids[start:start + n]
        return self.prompt_ids[start:] + self.output_ids[:start + n - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
