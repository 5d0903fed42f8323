"""Benchmark workloads: lists of requests with exact prompt token ids and output lengths.

Prompts are token-id lists (the OpenAI completions API accepts ``prompt`` as a list of ints), so
prompt lengths are exact regardless of the server's tokenizer. Everything here is pure and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Low ids are often special tokens (BOS, EOS, PAD, ...); random prompts stay above them.
MIN_TOKEN_ID = 10


@dataclass(frozen=True)
class RequestSpec:
    """One benchmark request: the prompt's token ids and how many tokens to generate."""

    prompt_ids: list[int]
    output_len: int
    group: int | None = None  # shared-prefix group, when the dataset has groups

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class LengthRange:
    """An inclusive range of lengths, written ``MIN:MAX`` (or a single ``N``) on the command line."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 0 or self.high < self.low:
            raise ValueError(f"length range must satisfy 0 <= MIN <= MAX, got {self.low}:{self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` lengths drawn uniformly from ``[low, high]``."""
        return [int(x) for x in rng.integers(self.low, self.high + 1, size=n)]


def parse_range(text: str) -> LengthRange:
    """Parse ``"MIN:MAX"`` or ``"N"`` into a :class:`LengthRange`."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            low = high = int(parts[0])
        elif len(parts) == 2:
            low, high = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"expected a length range like 128:512 or 256, got {text!r}") from None
    return LengthRange(low, high)


def _random_ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return [int(x) for x in rng.integers(MIN_TOKEN_ID, vocab_size, size=n)]


def _check_vocab(vocab_size: int) -> None:
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab size must exceed {MIN_TOKEN_ID} (ids below it are reserved), got {vocab_size}")


def random_dataset(
    num_prompts: int,
    input_len: LengthRange,
    output_len: LengthRange,
    vocab_size: int,
    seed: int = 0,
) -> list[RequestSpec]:
    """``num_prompts`` requests with prompt and output lengths drawn uniformly from the ranges."""
    _check_vocab(vocab_size)
    if input_len.low < 1:
        raise ValueError(f"prompts need at least one token; input length range starts at {input_len.low}")
    rng = np.random.default_rng(seed)
    in_lens = input_len.sample(rng, num_prompts)
    out_lens = output_len.sample(rng, num_prompts)
    return [RequestSpec(_random_ids(rng, n_in, vocab_size), n_out) for n_in, n_out in zip(in_lens, out_lens)]


def shared_prefix_dataset(
    num_prompts: int,
    num_groups: int,
    prefix_len: int,
    suffix_len: int,
    output_len: LengthRange,
    vocab_size: int,
    seed: int = 0,
) -> list[RequestSpec]:
    """Requests in ``num_groups`` groups; members of a group share a random ``prefix_len``-token prefix.

    Each request appends its own random ``suffix_len``-token suffix. Requests are spread evenly
    over the groups and shuffled, so groups interleave in arrival order.
    """
    _check_vocab(vocab_size)
    if num_groups < 1:
        raise ValueError(f"--num-groups must be at least 1, got {num_groups}")
    if prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len < 1:
        raise ValueError(f"prefix and suffix lengths must be >= 0 with a positive sum, got {prefix_len}, {suffix_len}")
    rng = np.random.default_rng(seed)
    prefixes = [_random_ids(rng, prefix_len, vocab_size) for _ in range(num_groups)]
    out_lens = output_len.sample(rng, num_prompts)
    specs = [
        RequestSpec(prefixes[i % num_groups] + _random_ids(rng, suffix_len, vocab_size), out_lens[i], i % num_groups)
        for i in range(num_prompts)
    ]
    order = rng.permutation(num_prompts)
    return [specs[int(i)] for i in order]


def arrival_offsets(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start for a Poisson process of ``request_rate`` requests/s.

    Gaps between arrivals are exponential with mean ``1 / request_rate``; an infinite rate sends
    everything at time zero.
    """
    if not request_rate > 0:
        raise ValueError(f"request rate must be positive (or inf), got {request_rate}")
    if np.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    gaps[0] = 0.0  # the first request goes out at once
    return [float(t) for t in np.cumsum(gaps)]
