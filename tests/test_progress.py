"""Progress bars through a pipe (matrixinfer/progress.py): a child with MATRIXINFER_PROGRESS_LINES
reports progress as lines, and the parent draws one bar per child from them instead of printing
every redraw as a line of its own (a P/D deployment's log is checked in test_bad_requests_served.py)."""

from __future__ import annotations

import io
import json

from matrixinfer import progress as progress_mod
from matrixinfer.progress import MARK, ChildBars, progress


def test_a_child_reports_progress_as_lines_from_zero_to_the_total(monkeypatch, capsys):
    monkeypatch.setenv(progress_mod.ENV, "1")
    assert list(progress(range(50), desc="loading m", unit="tensor")) == list(range(50))
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith(MARK) for line in lines)
    reports = [json.loads(line[len(MARK):]) for line in lines]
    assert reports[0] == {"desc": "loading m", "n": 0, "total": 50, "unit": "tensor"}
    assert reports[-1]["n"] == 50 and [r["n"] for r in reports] == sorted(r["n"] for r in reports)
    assert len(reports) <= 4  # at most every 0.2 s, not one line per item


def test_without_the_variable_it_is_tqdm_and_disabled_it_is_the_items(monkeypatch, capsys):
    monkeypatch.delenv(progress_mod.ENV, raising=False)
    assert list(progress(iter([1, 2]), desc="x", disable=True)) == [1, 2]
    assert list(progress([1, 2, 3], desc="x")) == [1, 2, 3]
    assert MARK not in capsys.readouterr().out


def test_the_parent_draws_progress_lines_and_leaves_other_lines_alone(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    bars = ChildBars(live=True)
    assert not bars.feed("prefill0", "2026 INFO weights loaded\n")
    assert not bars.feed("prefill0", MARK + "{not json\n")
    for n in (0, 10, 20):
        assert bars.feed("prefill0", MARK + json.dumps({"desc": "loading m", "n": n, "total": 20, "unit": "t"}))
    assert bars.feed("decode0", MARK + json.dumps({"desc": "loading m", "n": 5, "total": 20, "unit": "t"}))
    drawn = out.getvalue()
    assert "[prefill0] loading m" in drawn and "20/20" in drawn and "[decode0] loading m" in drawn
    assert MARK not in drawn


def test_into_a_log_two_children_loading_at_once_give_one_finished_line_each(monkeypatch):
    """stderr is not a terminal: no cursor movement, no half-drawn bars; one line per child when
    its bar is done, however the two children's reports interleave."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    bars = ChildBars()
    assert not bars.live
    line = lambda n: MARK + json.dumps({"desc": "loading m", "n": n, "total": 20, "unit": "t"})  # noqa: E731
    for n in (0, 5, 10, 15, 20):
        assert bars.feed("prefill0", line(n)) and bars.feed("decode0", line(min(n + 5, 20)))
    lines = out.getvalue().split("\n")
    for child in ("prefill0", "decode0"):
        mine = [x for x in lines if f"[{child}] loading m" in x]
        assert len(mine) == 1 and "20/20" in mine[0], lines
    assert "\x1b" not in out.getvalue() and MARK not in out.getvalue()
