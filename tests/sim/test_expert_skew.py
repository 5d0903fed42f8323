"""The default-balance prefill skew from measured routing snapshots (sim/expert_skew.py)."""

from __future__ import annotations

import json
import sys

import pytest

from matrixinfer.sim import expert_skew
from matrixinfer.sim.expert_skew import (
    SnapshotError,
    load_snapshot,
    measured_prefill_skew,
    placement_skew,
    share_drift_pairs,
    synthetic_skew,
)


def test_no_drift_and_equal_experts_leave_no_skew() -> None:
    pairs = share_drift_pairs([[5.0] * 16], [[7.0] * 16])
    assert pairs == [(1.0, 1.0)] * 16
    assert synthetic_skew(pairs, experts=64, ranks=8, redundant=8, draws=2) == pytest.approx(1.0)


def test_drift_the_history_did_not_see_is_skew() -> None:
    # the history pairs each hot expert (0, 1) with a cold one (2, 3); then 0 and 2 turn hot together
    history = [2.0, 2.0, 1.0, 1.0]
    traffic = [2.0, 1.0, 2.0, 1.0]
    assert placement_skew(history, traffic, ranks=2, redundant=0) == pytest.approx(4 / 3)
    # a plan made on the traffic itself balances it
    assert placement_skew(traffic, traffic, ranks=2, redundant=0) == pytest.approx(1.0)


def test_pairs_keep_share_and_drift_per_expert() -> None:
    pairs = share_drift_pairs([[3.0, 1.0, 0.0]], [[2.0, 2.0, 4.0]])
    # mean history load 4/3: shares 2.25 and 0.75; traffic shares 0.25 and 0.25 over 0.75 and 0.25
    assert pairs == [pytest.approx((2.25, 1 / 3)), pytest.approx((0.75, 1.0))]


def test_shipped_snapshots_give_a_skew_between_perfect_and_the_old_assumption() -> None:
    """The shipped demo-model snapshots: the skew is reproducible and lies in a plausible range
    (the figures the docs quote come from here)."""
    h, t = load_snapshot(expert_skew.HISTORY), load_snapshot(expert_skew.TRAFFIC)
    assert len(h) == len(t) >= 1 and sum(h[0]) > 0
    skew = measured_prefill_skew()
    assert 1.02 < skew < 1.6
    pairs = share_drift_pairs(h, t)
    assert synthetic_skew(pairs, 64, 8, 8, draws=2, seed=5) == synthetic_skew(pairs, 64, 8, 8, draws=2, seed=5)


def test_simulator_does_not_import_torch_for_the_skew() -> None:
    import subprocess
    code = "import sys, matrixinfer.sim.paper; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("content, match", [
    ("not json", "cannot read"),
    (json.dumps({"expert_tokens": []}), "expected 'expert_tokens'"),
    (json.dumps({"expert_tokens": [[1, 2], [1]]}), "different numbers"),
    (json.dumps({"expert_tokens": [[1, -2]]}), "non-negative"),
])
def test_bad_snapshots_are_named(tmp_path, content: str, match: str) -> None:
    p = tmp_path / "snap.json"
    p.write_text(content)
    with pytest.raises(SnapshotError, match=match):
        load_snapshot(p)


def test_mismatched_snapshots_are_refused() -> None:
    with pytest.raises(SnapshotError, match="differ"):
        share_drift_pairs([[1.0, 2.0]], [[1.0, 2.0, 3.0]])
