"""Per-request sampling parameters, validated with messages that name the bad field.

One type in process and on the wire: the router sends it to prefill and decode instances as is
(msgspec, no pickle), so a field added here reaches every instance without a hand-written copy.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to pick tokens for one request and when to stop.

    Attributes:
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens (-1 or 0: all).
        seed: per-request seed; the same seed and prompt give the same sample.
        max_tokens: most tokens to generate.
        min_tokens: stop conditions are ignored until this many tokens exist.
        stop: strings that end generation (not included in the output text).
        stop_token_ids: token ids that end generation (in addition to EOS).
        ignore_eos: keep generating past EOS (benchmarks use it for exact lengths).
        logprobs: return the log-probability of each chosen token.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k}")
        if self.max_tokens is None or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > 16:
            raise ValueError(f"at most 16 stop strings are supported, got {len(self.stop)}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
