"""The arena allocator against a simple model of intervals (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixinfer.ems.arena import ALIGN, Allocator, align_up

CAPACITY = 64 * ALIGN


def _gaps(used: dict[int, int], capacity: int) -> list[tuple[int, int]]:
    """Free intervals implied by the allocated ones."""
    gaps, pos = [], 0
    for off in sorted(used):
        if off > pos:
            gaps.append((pos, off - pos))
        pos = off + used[off]
    if pos < capacity:
        gaps.append((pos, capacity - pos))
    return gaps


ops = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(0, 20 * ALIGN)),
                         st.tuples(st.just("free"), st.integers(0, 1000))), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_allocator_matches_interval_model(seq):
    a = Allocator(CAPACITY)
    model: dict[int, int] = {}  # offset -> aligned size
    for op, arg in seq:
        if op == "alloc":
            need = align_up(arg)
            gaps = _gaps(model, CAPACITY)
            fitting = [g for g in gaps if g[1] >= need]
            off = a.alloc(arg)
            # succeeds exactly when some gap is large enough, and picks a smallest such gap (best fit)
            assert (off is not None) == bool(fitting)
            if off is not None:
                best = min(size for _, size in fitting)
                assert any(start == off and size == best for start, size in fitting)
                model[off] = need
        elif model:
            off = sorted(model)[arg % len(model)]
            a.free(off)
            del model[off]
        # free blocks are exactly the model's gaps: coalesced, no overlap, nothing lost
        assert a.free_blocks() == _gaps(model, CAPACITY)
        assert a.used_bytes == sum(model.values())
    for off in list(model):
        a.free(off)
    assert a.free_blocks() == [(0, CAPACITY)]


def test_free_of_unknown_offset_names_it():
    a = Allocator(CAPACITY)
    with pytest.raises(KeyError, match="offset 128"):
        a.free(128)


def test_oversized_request_fails_cleanly():
    a = Allocator(CAPACITY)
    assert a.alloc(CAPACITY + 1) is None
    assert a.alloc(CAPACITY) == 0
    assert a.largest_free() == 0
