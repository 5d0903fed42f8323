"""`simulate paper`: every figure within its band of the paper's (10%; model caching 20%).

Figures the honest cost model does not yet reach are listed in KNOWN_MISSES with the reason;
they are strict xfails, so a model change that brings one into band fails until it is removed
from the list (and one that pushes a passing figure out of band fails outright).
"""

import pytest

from matrixinfer.sim.paper import reproduce_paper
from matrixinfer.sim.shapes import deepseek_r1

FIGS = reproduce_paper(deepseek_r1())

_DECODE = ("decode at batch >= 24 runs 24-34% faster than measured: per layer at batch 96 + MTP "
           "the model has 936 us vs the paper's 1,260 (596 vs 874 without MTP). The paper's ~600 us "
           "is per microbatch per stream on 16 + 8 cores; at that split the model's streams take "
           "496/491 us, ~18% short, with half-batch MoE operators no cheaper than unsplit ones: a "
           "uniform shortfall that no operator measurement in the notes supplies (docs/simulator.md)")
_CACHE = ("context-cache gains come out larger than measured: the model's no-cache batch matches "
          "(~2.3-2.6 s vs ~2.5 s), but the paper's figures need a cost that grows with the cached "
          "share, 0.14-0.29 of the no-cache time per unit reuse, i.e. cached KV loaded at an "
          "effective 0.9-2 GB/s per die against the measured 147 GB/s UB read rate; the notes give "
          "no throughput for the pool's data path (docs/simulator.md)")
KNOWN_MISSES = {
    "TPOT, 1024/1024 batch 128": _DECODE, "tok/s/NPU, 1024/1024 batch 128": _DECODE,
    "TPOT, 2048/256 batch 112": _DECODE, "tok/s/NPU, 2048/256 batch 112": _DECODE,
    "TPOT, 4096/256 batch 96": _DECODE, "tok/s/NPU, 4096/256 batch 96": _DECODE,
    "TPOT, 4096/256 batch 24": _DECODE, "tok/s/NPU, 4096/256 batch 24": _DECODE,
    "TTFT reduction at 50% reuse": _CACHE, "throughput gain at 50% reuse": _CACHE,
    "TTFT reduction at 90% reuse": _CACHE, "throughput gain at 90% reuse": _CACHE,
    "tok/s/NPU, default expert balance": ("the skew from the demo model's measured routing "
                                          "(about 1.19, sim/expert_skew.py) gives +20%; about 1.68 "
                                          "would match, but only as a fit: R1's own load statistics "
                                          "are not published"),
}


@pytest.mark.parametrize(
    "fig",
    [pytest.param(f, id=f.name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[f.name]))
     if f.name in KNOWN_MISSES else pytest.param(f, id=f.name) for f in FIGS if f.measured],
)
def test_figure_within_band(fig):
    assert fig.within_band, f"{fig.name}: model {fig.model:.4g} vs paper {fig.paper:.4g} ({fig.rel_error:+.1%})"


def test_only_the_perfect_balance_prefill_figure_is_a_projection():
    # [paper §5]: 5,655 tok/s was measured; 6,688 under perfect balance is the paper's projection
    assert [f.name for f in FIGS if not f.measured] == ["tok/s/NPU, perfect expert balance"]


def test_profile_informed_cache_figures_follow_the_pool_path_rate():
    """Cached KV at a measured pool-path rate: no change where it is faster than the link, and the
    slower the path the smaller the gains (the direction of the paper's figures)."""
    def cache(figs):
        return {f.name: f.model for f in figs if f.section == "context cache"}
    analytic = cache(FIGS)
    assert cache(reproduce_paper(deepseek_r1(), 1e15)) == analytic
    fast, slow = cache(reproduce_paper(deepseek_r1(), 8e9)), cache(reproduce_paper(deepseek_r1(), 1e9))
    for name in ("TTFT reduction at 90% reuse", "throughput gain at 90% reuse", "throughput gain at 50% reuse"):
        assert analytic[name] > fast[name] > slow[name], name


def test_every_section_is_reproduced():
    sections = {f.section for f in FIGS}
    assert sections == {"prefill", "decode", "context cache", "model caching", "dispatch/combine"}
    assert sum(f.section == "decode" for f in FIGS) == 10   # five rows, TPOT and tok/s each
