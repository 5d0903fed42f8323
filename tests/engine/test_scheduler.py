"""The scheduling policy on its own: no model, no blocks, just decisions."""

from __future__ import annotations

from matrixinfer.engine.scheduler import Budget, SeqView, schedule

B = Budget(max_tokens=64, max_seqs=4, block_size=4)


def decode(sid: str, n: int, blocks: int | None = None) -> SeqView:
    """A running sequence with n tokens, n-1 computed (needs one more)."""
    return SeqView(sid, n, n - 1, blocks if blocks is not None else -(-(n - 1) // 4), freeable=-(-(n - 1) // 4))


def test_decodes_run_and_prompts_are_chunked_to_the_budget():
    running = [decode("a", 9), decode("b", 5)]
    waiting = [SeqView("c", 100, 0, 0)]
    plan = schedule(running, waiting, free_blocks=100, budget=B)
    assert plan.chunks == {"a": 1, "b": 1, "c": 62}  # 64 - 2 decode tokens
    assert plan.admitted == ["c"] and plan.preempted == []


def test_running_prefill_continues_before_new_admissions():
    running = [SeqView("a", 100, 62, 16)]  # partially prefilled
    waiting = [SeqView("b", 10, 0, 0)]
    plan = schedule(running, waiting, free_blocks=100, budget=B)
    assert plan.chunks == {"a": 38, "b": 10}


def test_sequence_cap_limits_admission():
    running = [decode(s, 5) for s in "abcd"]
    plan = schedule(running, [SeqView("e", 4, 0, 0)], free_blocks=100, budget=B)
    assert "e" not in plan.chunks and plan.admitted == []


def test_newest_running_is_preempted_when_blocks_run_out():
    # each decode crosses a block boundary (8 tokens computed -> 9th needs a 3rd block)
    running = [decode("old", 9, 2), decode("mid", 9, 2), decode("new", 9, 2)]
    plan = schedule(running, [SeqView("w", 4, 0, 0)], free_blocks=1, budget=B)
    assert plan.preempted == ["new"]
    assert plan.chunks == {"old": 1, "mid": 1}
    assert plan.admitted == []  # no admissions while memory is short


def test_lone_sequence_that_does_not_fit_waits():
    plan = schedule([decode("a", 9, 2)], [], free_blocks=0, budget=B)
    assert plan.preempted == ["a"] and plan.chunks == {}


def test_fcfs_head_of_line_blocks_later_requests():
    waiting = [SeqView("big", 40, 0, 0), SeqView("small", 4, 0, 0)]
    plan = schedule([], waiting, free_blocks=5, budget=B)
    assert plan.admitted == [] and plan.chunks == {}


def test_prefix_hit_reduces_blocks_and_tokens_needed():
    # 32 of 40 prompt tokens cached in 8 blocks, 2 of which sit in the free pool (revived)
    waiting = [SeqView("hit", 40, 32, 8, revive=2)]
    plan = schedule([], waiting, free_blocks=4, budget=B)
    assert plan.chunks == {"hit": 8}  # needs 2 new blocks + 2 revived = 4
    assert schedule([], waiting, free_blocks=3, budget=B).admitted == []


def test_speculating_decodes_ask_for_their_drafts_within_budget_and_blocks():
    from dataclasses import replace

    running = [replace(decode("a", 8), lookahead=2), replace(decode("b", 8), lookahead=2)]
    plan = schedule(running, [], free_blocks=100, budget=B)
    assert plan.chunks == {"a": 3, "b": 3}  # the last token and two drafts each
    plan = schedule(running, [], free_blocks=100, budget=Budget(max_tokens=4, max_seqs=4, block_size=4))
    assert plan.chunks == {"a": 3, "b": 1}  # the budget leaves b no room for drafts
    # 7 computed: the drafts need a third block; with one free block the newest is preempted
    plan = schedule(running, [], free_blocks=1, budget=B)
    assert plan.chunks == {"a": 3} and plan.preempted == ["b"]
