"""Datasets: exact lengths, reserved ids avoided, shared prefixes shared, seeded arrivals."""

from __future__ import annotations

import math

import pytest

from matrixinfer.bench.datasets import (
    MIN_TOKEN_ID,
    LengthRange,
    arrival_offsets,
    parse_range,
    random_dataset,
    shared_prefix_dataset,
)


def test_parse_range_forms_and_errors() -> None:
    assert parse_range("128:512") == LengthRange(128, 512)
    assert parse_range("64") == LengthRange(64, 64)
    for bad in ("a:b", "1:2:3", "9:3", ""):
        with pytest.raises(ValueError, match="range"):
            parse_range(bad)


def test_random_dataset_lengths_ids_and_seed() -> None:
    specs = random_dataset(200, LengthRange(5, 20), LengthRange(3, 7), vocab_size=50, seed=1)
    assert len(specs) == 200
    assert {s.prompt_len for s in specs} <= set(range(5, 21))
    assert {s.output_len for s in specs} == set(range(3, 8))  # 200 draws hit every value
    assert all(MIN_TOKEN_ID <= t < 50 for s in specs for t in s.prompt_ids)
    assert specs == random_dataset(200, LengthRange(5, 20), LengthRange(3, 7), vocab_size=50, seed=1)
    assert specs != random_dataset(200, LengthRange(5, 20), LengthRange(3, 7), vocab_size=50, seed=2)


def test_random_dataset_rejects_tiny_vocab_and_empty_prompts() -> None:
    with pytest.raises(ValueError, match="vocab size"):
        random_dataset(1, LengthRange(1, 2), LengthRange(1, 2), vocab_size=10)
    with pytest.raises(ValueError, match="at least one token"):
        random_dataset(1, LengthRange(0, 2), LengthRange(1, 2), vocab_size=100)


def test_shared_prefix_groups_share_exactly_the_prefix() -> None:
    specs = shared_prefix_dataset(
        24, num_groups=3, prefix_len=16, suffix_len=4, output_len=LengthRange(2, 2), vocab_size=1000, seed=0
    )
    assert len(specs) == 24 and all(s.prompt_len == 20 and s.output_len == 2 for s in specs)
    by_group: dict[int, list] = {}
    for s in specs:
        by_group.setdefault(s.group, []).append(s)
    assert sorted(by_group) == [0, 1, 2] and all(len(v) == 8 for v in by_group.values())
    prefixes = {g: {tuple(s.prompt_ids[:16]) for s in v} for g, v in by_group.items()}
    assert all(len(p) == 1 for p in prefixes.values())  # one prefix per group
    assert len({next(iter(p)) for p in prefixes.values()}) == 3  # distinct across groups
    assert [s.group for s in specs[:8]] != sorted(s.group for s in specs[:8])  # interleaved, not blocked


def test_arrival_offsets_poisson_mean_and_inf() -> None:
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    times = arrival_offsets(5000, request_rate=100.0, seed=3)
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] / 4999 == pytest.approx(0.01, rel=0.1)
    with pytest.raises(ValueError, match="positive"):
        arrival_offsets(3, 0.0)
