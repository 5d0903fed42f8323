"""Where an EP instance's experts start with ``--redundant-experts`` (pure; the running instance's
redundant experts and live rebalance are tested with real rank processes in test_dp_engine.py)."""

from __future__ import annotations

import pytest

from matrixinfer.config import EngineConfig
from matrixinfer.parallel.launch import initial_placement


def test_redundant_experts_must_fill_the_ranks_evenly():
    p = initial_placement(4, 2, 2)
    assert [len(x) for x in p.slots] == [3, 3] and p.n_redundant == 2
    assert initial_placement(10, 4, 0).as_table() == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]  # contiguous
    with pytest.raises(ValueError, match="do not divide over 2 ranks"):
        initial_placement(4, 2, 1)
    with pytest.raises(ValueError, match="live rebalance needs the 10 routed experts"):
        initial_placement(10, 4, 0, live=True)
    with pytest.raises(ValueError, match="redundant_experts"):
        EngineConfig(redundant_experts=-1)
