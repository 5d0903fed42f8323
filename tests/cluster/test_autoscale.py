"""The scaling policy (pure): hysteresis, cooldown, bounds, reasons, and its Prometheus series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from matrixinfer.cluster.autoscale import PoolSignals, ScaleState, ScalingMetrics, decide, windowed_mean
from matrixinfer.cluster.spec import Autoscale, Pool

CFG = Autoscale(up_after=2, down_after=3, cooldown_s=10.0, queue_per_instance_high=4, queue_per_instance_low=0.5,
                latency_high=0.9, latency_low=0.5)
POOL = Pool(instances=1, min_instances=1, max_instances=3)
SLO = 0.1  # 100 ms TPOT


def run(signals: list[PoolSignals], dt: float = 5.0, role: str = "decode"):
    """Apply the policy to a sequence of observations, the instance count following its targets."""
    state, out, n = ScaleState(), [], None
    for i, s in enumerate(signals):
        s = PoolSignals(n if n is not None else s.instances, s.queued, s.latency_s)
        d = decide(role, s, SLO, POOL, CFG, state, now=i * dt)
        state, n = d.state, d.target
        out.append(d)
    return out


def test_a_load_step_scales_up_within_bounds_then_down():
    busy = [PoolSignals(1, 20, 0.15)] * 12  # 20 queued and TPOT 150 ms: far over
    quiet = [PoolSignals(1, 0, 0.02)] * 20
    decisions = run(busy + quiet)
    targets = [d.target for d in decisions]
    assert max(targets) == 3  # max_instances, never more
    assert targets[0] == 1 and targets[1] == 2  # two votes, then one step
    assert targets[2] == 2  # the cooldown holds the next step (10 s = two decisions)
    assert targets[11] == 3 and "at max_instances 3" in decisions[11].reason
    assert targets[-1] == 1  # back to min_instances, one step at a time
    steps = [b - a for a, b in zip(targets, targets[1:])]
    assert set(steps) <= {-1, 0, 1}
    assert "queue 20.0/instance > 4" in decisions[1].reason
    assert "queue 0.0/instance < 0.5" in next(d for d in decisions if d.action == "down").reason


def test_hysteresis_the_band_holds_and_blips_do_not_scale():
    band = run([PoolSignals(2, 2, 0.07)] * 10)  # 1 queued per instance, TPOT 70%: between the marks
    assert {d.target for d in band} == {2} and all("within the band" in d.reason for d in band)
    blips = run([PoolSignals(2, 20, 0.2), PoolSignals(2, 2, 0.07)] * 5)  # never two in a row
    assert {d.target for d in blips} == {2}
    assert "up 1/2" in blips[0].reason


def test_latency_alone_scales_prefill():
    d = run([PoolSignals(1, 0, 0.095)] * 2, role="prefill")  # TTFT at 95% of its SLO, empty queue
    assert d[-1].target == 2 and "TTFT 95 ms = 95% of the SLO 100 ms > 90%" in d[-1].reason


def test_bounds_are_restored_first():
    d = decide("decode", PoolSignals(0, 0, None), SLO, POOL, CFG, ScaleState(), 0.0)
    assert (d.action, d.target) == ("up", 1) and "< min_instances 1" in d.reason
    d = decide("decode", PoolSignals(5, 0, None), SLO, POOL, CFG, ScaleState(), 0.0)
    assert (d.action, d.target) == ("down", 3)


def test_windowed_mean():
    assert windowed_mean((1.0, 10), (3.0, 20)) == 0.2
    assert windowed_mean((1.0, 10), (1.0, 10)) is None


def test_decisions_are_exported():
    m = ScalingMetrics()
    for d in run([PoolSignals(1, 20, 0.15)] * 3):
        m.record(d, 1)
    reg = CollectorRegistry()
    reg.register(m)
    assert reg.get_sample_value("matrixinfer_autoscale_decisions_total", {"pool": "decode", "action": "up"}) == 1
    assert reg.get_sample_value("matrixinfer_autoscale_decisions_total", {"pool": "decode", "action": "hold"}) == 2
    assert reg.get_sample_value("matrixinfer_autoscale_target_instances", {"pool": "decode"}) == 2
    assert b"queue 10.0/instance > 4" in generate_latest(reg)  # the last reason: 20 queued over 2 instances
