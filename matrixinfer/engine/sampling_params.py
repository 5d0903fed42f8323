"""Per-request sampling parameters, validated with messages that name the bad field.

One type in process and on the wire: the router sends it to prefill and decode instances as is
(msgspec, no pickle), so a field added here reaches every instance without a hand-written copy.

Validation follows vLLM's ranges and adds the bounds the sampler and the wire need, so that no
value accepted here can make torch raise later (a raise there would fail the request inside the
engine instead of answering 400 up front): integers fit in 64 bits (msgpack's limit), temperatures
between 0 and ``MIN_TEMPERATURE`` are raised to it as vLLM does (smaller ones overflow the scaled
logits; below ``GREEDY_BELOW`` the request is greedy), and a ``top_p`` under ``MIN_TOP_P`` keeps
only the most likely token, exactly as ``MIN_TOP_P`` does (one that rounds to 0 in float32 would
mask every token).
"""

from __future__ import annotations

import msgspec

MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: smaller temperatures are raised to it
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it means greedy
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 1e-6
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice")
MAX_STRUCTURED_SPEC = 1 << 20  # characters of a schema, regex or choice list


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value: object) -> str:
    """``repr(value)``, except that an integer too long to print usefully is described by its size."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What the output must match (OpenAI's ``response_format``; vLLM's ``guided_regex`` and
    ``guided_choice``), enforced token by token by :mod:`matrixinfer.engine.structured`.

    Attributes:
        kind: ``json_object`` (any JSON object), ``json_schema`` (``spec``: the schema as JSON
            text), ``regex`` (``spec``: the regular expression) or ``choice`` (``spec``: a JSON list
            of the allowed strings).
        spec: see ``kind`` (empty for ``json_object``).
    """

    kind: str
    spec: str = ""


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to pick tokens for one request and when to stop.

    Attributes:
        temperature: 0 means greedy; otherwise logits are divided by it before sampling (at most
            100; values in (0, 1e-2) are raised to 1e-2, values under 1e-5 mean greedy).
        top_p: nucleus sampling mass in (0, 1] (values under 1e-6 act as 1e-6: the top token only).
        top_k: keep the k most likely tokens (-1 or 0: all).
        seed: per-request seed (a 64-bit integer); the same seed and prompt give the same sample.
        max_tokens: most tokens to generate.
        min_tokens: stop conditions are ignored until this many tokens exist.
        stop: strings that end generation (not included in the output text; at most 16).
        stop_token_ids: token ids that end generation (in addition to EOS; at most 1024).
        ignore_eos: keep generating past EOS (benchmarks use it for exact lengths).
        logprobs: return the log-probability of each chosen token.
        min_p: drop tokens whose probability (after temperature) is under ``min_p`` times the most
            likely token's (0: off).
        presence_penalty: subtracted from the logit of every token already generated ([-2, 2]).
        frequency_penalty: subtracted once per earlier occurrence in the output ([-2, 2]).
        repetition_penalty: logits of tokens in the prompt or output are divided by it when
            positive and multiplied by it when negative (1: off; (0, 10]).
        logit_bias: token id -> value added to its logit before sampling ([-100, 100]; at most
            300 entries). Penalties and biases apply to greedy requests too.
        top_logprobs: also return the ``top_logprobs`` most likely tokens and their
            log-probabilities at each generated position (0 to 20; needs ``logprobs``).
        structured: constrain the output to a grammar (:class:`StructuredOutput`); the request then
            ends with EOS once the grammar is complete (``ignore_eos`` is refused with it).
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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    top_logprobs: int = 0
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()
        # numerically safe equivalents (idempotent: a decoded copy normalizes to the same values)
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        elif self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if self.top_p < MIN_TOP_P:
            self.top_p = MIN_TOP_P

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens seen so far (the sampler then needs them)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_history(self) -> bool:
        """Whether the sampler needs the row's tokens so far (penalties; a grammar's state)."""
        return self.penalized or self.structured is not None

    @property
    def processed(self) -> bool:
        """Whether the logits are changed before the greedy pick (penalties or biases)."""
        return self.penalized or bool(self.logit_bias)

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        t = self.temperature
        if not _is_number(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {shown(t)}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {shown(self.top_p)}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive 64-bit integer, got {shown(self.top_k)}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= UINT64_MAX):
            raise ValueError(f"seed must be a 64-bit integer, got {shown(self.seed)}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens must be an integer of at least 1, got {shown(self.max_tokens)}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {shown(self.min_tokens)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(self.stop_token_ids)}")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative 64-bit integers")
        if not isinstance(self.ignore_eos, bool) or not isinstance(self.logprobs, bool):
            raise ValueError("ignore_eos and logprobs must be booleans")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be a number in [0, 1], got {shown(self.min_p)}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {shown(v)}")
        r = self.repetition_penalty
        if not _is_number(r) or not 0.0 < r <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}], got {shown(r)}")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases")
        for t, b in self.logit_bias.items():
            if not _is_int(t) or not 0 <= t <= INT64_MAX or not _is_number(b) or not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias maps token ids (non-negative integers) to numbers in [-100, 100], "
                                 f"got {shown(t)}: {shown(b)}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {shown(self.top_logprobs)}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        so = self.structured
        if so is not None:
            if not isinstance(so, StructuredOutput) or so.kind not in STRUCTURED_KINDS:
                raise ValueError(f"structured must be one of {', '.join(STRUCTURED_KINDS)}")
            if not isinstance(so.spec, str) or len(so.spec) > MAX_STRUCTURED_SPEC:
                raise ValueError(f"structured: the {so.kind} must be a string of at most {MAX_STRUCTURED_SPEC} "
                                 "characters")
            if self.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured output (the grammar ends the "
                                 "output with EOS)")
