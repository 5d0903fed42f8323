"""The speculation policy on its own (engine/spec_policy.py, engine/step_costs.py): synthetic step
costs and acceptance, no model. A simulated engine runs the policy's decisions at "true" costs that
differ from the start-up measurement, feeding the times back, as :class:`LLMEngine` does."""

from __future__ import annotations

import random

import pytest

from matrixinfer.engine.spec_policy import EXPLORE_MIN, EXPLORE_RUN, AcceptanceTracker, SpecPolicy
from matrixinfer.engine.step_costs import ALPHA, LOAD_ALPHA, LearnedCosts, StepCosts


def _simulate(policy: SpecPolicy, batch: int, true_costs: list[float], accept: list[float], steps: int,
              seed: int = 0, noise: float = 0.0) -> tuple[list[int], float, float]:
    """``steps`` decode steps at ``batch``: each runs the policy's depth, takes ``true_costs[depth]``
    seconds (times a random factor up to ``1 + noise``), verifies drafts accepted with the
    conditional rates ``accept``, and reports back. Returns the depths run, tokens per sequence and
    seconds."""
    rng = random.Random(seed)
    depths, tokens, seconds = [], 0.0, 0.0
    prev = -1
    for _ in range(steps):
        k = policy.decide(batch)
        depths.append(k)
        t = true_costs[k] * (1.0 + noise * rng.random())
        if k == prev:  # as the engine: a step is measured where the one before ran the same depth
            policy.observe(batch, k, t)
        prev = k
        seconds += t
        for _ in range(batch):
            held = 0
            while held < k and rng.random() < accept[held]:
                held += 1
            if k:
                policy.tracker.record(k, held)
            tokens += held + 1
    return depths, tokens, seconds


# -- learned step costs ----------------------------------------------------------------------------------
def test_learned_costs_start_from_the_prior_and_follow_the_measured_steps():
    prior = StepCosts((1, 4), plain=(1.0, 2.0), spec=((1.4, 3.0), (1.9, 4.0)))
    costs = LearnedCosts(prior)
    assert costs.at(1) == pytest.approx([1.0, 1.4, 1.9]) and costs.at(2) == pytest.approx([4 / 3, 1.4 + 1.6 / 3,
                                                                                          1.9 + 2.1 / 3])
    for _ in range(40):
        costs.observe(1, 2, 1.5)  # two drafts really cost 1.5x
    assert costs.at(1)[2] == pytest.approx(1.5, rel=1e-3) and costs.measured(1, 2) == 40
    # a depth not measured follows most of the change as load (from 1.0, where 1.5 / 1.9 would be all)
    assert 1.5 / 1.9 < costs.at(1)[0] < 0.9
    for _ in range(40):
        costs.observe(1, 0, 1.0)
    assert costs.at(1)[0] == pytest.approx(1.0, rel=1e-3)
    # another bucket (batch 2-3) still has the start-up figures
    plain, spec = prior.at(3)
    assert costs.at(3) == pytest.approx([plain, *spec])


def test_a_depth_explored_in_a_busy_spell_is_compared_with_the_steps_around_it():
    """Two drafts really cost 1.5x a plain step. The policy runs two drafts, a plain step every 10th;
    then other processes take half the machine and every step takes twice as long. The learned
    ratio stays 1.5 (measured per depth alone, the plain steps of the busy spell would be compared
    with the quiet steps before it), and the load is followed within a few steps."""
    costs = LearnedCosts(StepCosts((1,), plain=(1.0,), spec=((1.4,), (1.9,))))
    for load in (1.0, 2.0):
        for i in range(60):
            if i % 10 == 9:
                costs.observe(1, 0, 1.0 * load)
            else:
                costs.observe(1, 2, 1.5 * load)
        t = costs.at(1)
        assert t[2] / t[0] == pytest.approx(1.5, rel=0.1) and t[2] == pytest.approx(1.5 * load, rel=0.05)


def test_a_preempted_step_moves_the_estimate_a_little():
    costs = LearnedCosts(StepCosts((1,), plain=(1.0,), spec=((1.5,),)))
    for _ in range(20):
        costs.observe(1, 0, 1.0)
        costs.observe(1, 1, 1.5)
    before = costs.at(1)
    costs.observe(1, 1, 30.0)  # descheduled for most of the step
    after = costs.at(1)
    # clipped at CLIP = 3x: the load takes LOAD_ALPHA of it, the depth ALPHA of the rest
    assert after[1] / after[0] == pytest.approx(before[1] / before[0] * 3.0 ** (ALPHA * (1 - LOAD_ALPHA)), rel=1e-3)
    for _ in range(10):
        costs.observe(1, 1, 1.5)
    assert costs.at(1)[1] == pytest.approx(1.5, rel=0.02)


def test_nothing_is_learned_past_a_complete_measurement():
    costs = LearnedCosts(StepCosts((1, 2), plain=(1.0, 1.0), spec=((1.1, 2.0),), complete=True))
    costs.observe(8, 1, 0.5)
    assert costs.at(8) is None and costs.measured(8, 1) == 0
    with pytest.raises(ValueError):
        costs.observe(1, 2, 1.0)  # deeper than K
    with pytest.raises(ValueError):
        StepCosts((1,), plain=(0.0,), spec=((1.0,),))


# -- the policy ------------------------------------------------------------------------------------------
def test_policy_speculates_where_the_measured_costs_pay():
    costs = StepCosts((1, 2, 4, 8, 16), plain=(1.0, 1.0, 1.1, 1.3, 2.0), spec=((1.2, 1.25, 1.5, 2.2, 3.9),))
    tracker = AcceptanceTracker(1, prior=0.65)
    policy = SpecPolicy(1, tracker, costs)
    assert tracker.expected_tokens(1) == pytest.approx(1.65)
    assert [b for b in (1, 2, 3, 4, 8, 12, 16, 64) if policy.speculate(b)] == [1, 2, 3, 4]
    assert policy.break_even_batch(64) == 6  # interpolated: 1.65 * 1.2 > 1.05 * 1.85 at 6, not at 7
    rng = random.Random(0)
    for _ in range(5000):  # acceptance falls to ~0.2: speculation stops paying even at batch 1
        tracker.record(1, int(rng.random() < 0.2))
    assert tracker.rates()[0] == pytest.approx(0.2, abs=0.05) and not policy.speculate(1)
    # a complete measurement: from its last batch size on (where no acceptance could make it pay)
    # speculation is neither chosen nor tried
    done = StepCosts((1, 2), plain=(1.0, 1.0), spec=((1.1, 2.0),), complete=True)
    policy = SpecPolicy(1, AcceptanceTracker(1), done)
    assert policy.speculate(1) and not policy.speculate(2) and policy.limit == 1
    assert not any(policy.decide(2) or policy.decide(3) for _ in range(2000))
    assert SpecPolicy(2, AcceptanceTracker(2), max_batch=4).speculate(4)
    assert not SpecPolicy(2, AcceptanceTracker(2), max_batch=4).speculate(5)
    assert SpecPolicy(2, AcceptanceTracker(2), max_batch=4).limit == 4


def test_policy_picks_the_draft_count_that_pays_most():
    # two drafts cost little more than one at batch 1, much more at batch 8
    costs = StepCosts((1, 8, 64), plain=(1.0, 1.2, 3.0), spec=((1.15, 1.6, 6.5), (1.3, 2.4, 9.5)))
    policy = SpecPolicy(2, AcceptanceTracker(2, prior=0.65), costs)
    assert [policy.choose(b) for b in (1, 8, 64)] == [2, 1, 0]
    assert SpecPolicy(1, AcceptanceTracker(1, prior=0.65), costs).choose(1) == 1  # K caps the count
    with pytest.raises(ValueError):
        StepCosts((1, 2), plain=(1.0, 1.0), spec=((1.0,),))


def test_measured_costs_move_the_policy_to_two_drafts_when_they_pay_more():
    """The demo model at batch 1: the start-up measurement put one draft at 1.35x a plain step and
    two at 1.9x, so at the measured acceptance (0.85, then 0.9) one draft looks best; the engine's
    steps show two drafts at 1.5x. Within a few dozen steps the policy drafts two and stays there,
    running the other depths only now and then (a share bounded by the exploration budget)."""
    prior = StepCosts((1,), plain=(1.0,), spec=((1.35,), (1.9,)))
    tracker = AcceptanceTracker(2)
    for i in range(100):  # acceptance already measured at one draft
        tracker.record(1, int(i % 20 < 17))
    policy = SpecPolicy(2, tracker, prior)
    assert policy.choose(1) == 1
    depths, tokens, seconds = _simulate(policy, 1, [1.0, 1.3, 1.5], [0.85, 0.9], 400, noise=0.2)
    first = depths.index(2)
    assert first < 40 and policy.choose(1) == 2
    assert depths[first + 20:].count(2) / len(depths[first + 20:]) > 0.9
    best = (1 + 0.85 + 0.85 * 0.9) / 1.5 / 1.1  # tokens per second at depth 2 (noise: 1.1x on average)
    assert tokens / seconds > 0.93 * best


def test_where_speculation_costs_more_than_it_gains_the_policy_turns_it_off():
    """A wide batch whose start-up measurement (noisy, not complete) said speculation was cheap:
    the measured steps say it is not, the policy stops speculating, and what it still runs to keep
    the costs measured leaves at least 0.98x the throughput of never speculating."""
    prior = StepCosts((1, 64), plain=(1.0, 4.0), spec=((1.3, 4.6), (1.5, 5.2)))
    policy = SpecPolicy(2, AcceptanceTracker(2, prior=0.8), prior)
    assert policy.choose(64) == 2
    true = [4.0, 9.0, 13.0]  # compute bound: each draft adds more than a plain step
    depths, _, _ = _simulate(policy, 64, true, [0.8, 0.9], 60)
    assert policy.choose(64) == 0 and depths[-20:].count(0) >= 17
    depths, tokens, seconds = _simulate(policy, 64, true, [0.8, 0.9], 2000, seed=1)
    assert tokens / seconds >= 0.98 * 64 / true[0]
    assert 0 < sum(1 for k in depths if k) < 0.1 * len(depths)  # still measured now and then


def test_a_declining_policy_explores_and_learns_the_acceptance():
    """At the prior acceptance (0.6) one draft does not pay at 1.55x a plain step, so the policy
    declines, but running it loses little, so its turns come every EXPLORE_MIN steps; once
    acceptance is measured at 0.8 it speculates."""
    costs = StepCosts((1, 8, 16), plain=(1.0, 1.0, 1.0), spec=((1.55, 2.2, 2.5),), complete=True)
    tracker = AcceptanceTracker(1)
    policy = SpecPolicy(1, tracker, costs)
    assert policy.choose(1) == 0
    steps = [policy.decide(1) for _ in range(4 * EXPLORE_MIN)]
    # each turn is EXPLORE_RUN steps (the engine measures those after the first)
    assert steps[:EXPLORE_MIN - 1 + EXPLORE_RUN] == [0] * (EXPLORE_MIN - 1) + [1] * EXPLORE_RUN
    assert sum(steps) >= 2 * EXPLORE_RUN
    # at batch 8 (2.2x) one step with a draft loses ~27%: its turns come far more rarely (the first
    # few sooner, while its figures are guesses)
    steps = [policy.decide(8) for _ in range(400)]
    assert EXPLORE_RUN <= sum(steps) <= 4 * EXPLORE_RUN
    for i in range(60):  # what the explored verifications measure
        tracker.record(1, int(i % 5 != 0))
    assert policy.choose(1) == 1 and policy.decide(1) == 1 and policy.choose(8) == 0


def test_a_policy_at_one_draft_explores_the_second_and_learns_its_acceptance():
    """With K = 2 one draft pays more (1.3x a plain step) than two (1.7x) at the prior; two drafts
    still run now and then, and once the second depth is measured at 0.9 (and its cost at 1.45x)
    the policy drafts two."""
    policy = SpecPolicy(2, AcceptanceTracker(2), StepCosts((1,), plain=(1.0,), spec=((1.3,), (1.7,))))
    assert policy.choose(1) == 1
    depths, _, _ = _simulate(policy, 1, [1.0, 1.3, 1.45], [0.9, 0.9], 200)
    assert 2 in depths[:60] and policy.choose(1) == 2


def test_an_unmeasured_depth_starts_from_the_acceptance_of_the_depth_before():
    """Steps at one draft measure only the first depth; the second is then expected to hold as
    often as the first, so a high first-depth acceptance moves the policy to two drafts at once
    (with the fixed prior, 0.6, it would stay at one until exploration had measured the second)."""
    costs = StepCosts((1,), plain=(1.0,), spec=((1.4,), (1.8,)))
    tracker = AcceptanceTracker(2)
    policy = SpecPolicy(2, tracker, costs)
    assert tracker.rates() == [pytest.approx(0.6), pytest.approx(0.6)] and policy.choose(1) == 1
    for i in range(40):  # one-draft verifications, 9 in 10 accepted
        tracker.record(1, int(i % 10 != 0))
    first, second = tracker.rates()
    assert first == pytest.approx(second) and first > 0.8
    assert policy.choose(1) == 2
    for _ in range(200):  # the second depth, once verified, is measured on its own: here never accepted
        tracker.record(2, 1)
    assert tracker.rates()[1] < 0.1 and policy.choose(1) == 1


def test_acceptance_per_depth():
    t = AcceptanceTracker(2, prior=0.5, weight=0.0, decay=1.0)
    t.record(2, 2)
    t.record(2, 1)
    t.record(2, 0)
    assert t.rates() == [pytest.approx(2 / 3), pytest.approx(1 / 2)]
    assert t.expected_tokens(2) == pytest.approx(1 + 2 / 3 + 1 / 3)
    with pytest.raises(ValueError):
        t.record(2, 3)


def test_drafts_made_ahead_follow_an_exploring_turn():
    """The depth drafted ahead for the next step is that of an exploring turn while it goes on (so
    an explored step finds its drafts made, as a step at the chosen depth does, and is not charged
    a draft call of its own), else the chosen one."""
    policy = SpecPolicy(2, AcceptanceTracker(2), StepCosts((1,), plain=(1.0,), spec=((1.3,), (1.7,))))
    assert policy.choose(1) == 1 and policy.ahead(1) == 1
    depths, aheads = [], []
    for _ in range(300):
        depths.append(policy.decide(1))
        aheads.append(policy.ahead(1))
    turn = depths.index(2)
    assert depths[turn:turn + EXPLORE_RUN] == [2] * EXPLORE_RUN
    # ahead of every step of the turn but its first (drafted before the turn began): two drafts
    assert aheads[turn:turn + EXPLORE_RUN] == [2] * (EXPLORE_RUN - 1) + [1]
    # whenever a step runs the depth of the step before (a turn going on, or the chosen depth), it was drafted ahead
    assert all(a == n for d, n, a in zip(depths, depths[1:], aheads) if d == n)
    assert {0, 2} <= set(depths)  # turns of both other depths were checked
    assert policy.ahead(64) == policy.choose(64)  # another bucket: no turn there


def test_the_policy_settles_once_every_other_depth_had_its_first_turns():
    """Exploration turns come sooner until each depth not chosen has had EXPLORE_SETTLE of them in
    the bucket; ``settled`` says when that holds, and from then on the other depths run at most
    about the explore budget's share of steps."""
    policy = SpecPolicy(2, AcceptanceTracker(2), StepCosts((1,), plain=(1.0,), spec=((1.3,), (1.45,))))
    for _ in range(40):
        policy.tracker.record(2, 2)
    assert policy.choose(1) == 2 and not policy.settled(1)
    true = [1.0, 1.3, 1.45]
    early, _, _ = _simulate(policy, 1, true, [0.9, 0.9], 200)
    steps = 200
    while not policy.settled(1):
        _simulate(policy, 1, true, [0.9, 0.9], 100)
        steps += 100
        assert steps < 20000
    assert steps > 200  # not after the first turns
    late, _, _ = _simulate(policy, 1, true, [0.9, 0.9], 4000, seed=2)
    share = lambda ds: sum(1 for k in ds if k != 2) / len(ds)  # noqa: E731
    assert share(early) > 3 * share(late) and share(late) < 0.03
    # a fixed cut-off never explores: settled at once
    assert SpecPolicy(2, AcceptanceTracker(2), max_batch=4).settled(1)
