"""`simulate paper`: every figure within its band of the paper's (10%; model caching 20%).

Figures the honest cost model does not yet reach are listed in KNOWN_MISSES with the reason;
they are strict xfails, so a model change that brings one into band fails until it is removed
from the list (and one that pushes a passing figure out of band fails outright).
"""

import pytest

from matrixinfer.sim.paper import reproduce_paper
from matrixinfer.sim.shapes import deepseek_r1

FIGS = reproduce_paper(deepseek_r1())

_DECODE = ("decode at batch >= 24 runs 22-34% faster than measured: per layer at batch 96 + MTP "
           "the model has 938 us vs the paper's 1,260 (603 vs 874 without MTP); the attention "
           "stream matches the measured ~600 us, the MoE stream is ~416 us vs ~600 us and no "
           "operator-level figure in the notes supplies the difference (docs/simulator.md)")
_CACHE = ("context-cache gains come out larger than measured: the paper's four figures fit "
          "t(reuse) = 0.375 + 0.625 x (1 - reuse) of the no-cache time, i.e. ~37% of prefill time "
          "that caching does not remove; the model's non-scaling parts (pool load at 147 GB/s, "
          "K/V up-projection and all-gather of the cached latents) fit ~8%, and the "
          "paper's UB-vs-VPC 1.52x itself bounds the pool load over UB near 1% (docs/simulator.md)")
KNOWN_MISSES = {
    "TPOT, 1024/1024 batch 128": _DECODE, "tok/s/NPU, 1024/1024 batch 128": _DECODE,
    "TPOT, 2048/256 batch 112": _DECODE, "tok/s/NPU, 2048/256 batch 112": _DECODE,
    "TPOT, 4096/256 batch 96": _DECODE, "tok/s/NPU, 4096/256 batch 96": _DECODE,
    "TPOT, 4096/256 batch 24": _DECODE, "tok/s/NPU, 4096/256 batch 24": _DECODE,
    "TTFT reduction at 50% reuse": _CACHE, "throughput gain at 50% reuse": _CACHE,
    "TTFT reduction at 90% reuse": _CACHE, "throughput gain at 90% reuse": _CACHE,
    "tok/s/NPU, default expert balance": ("rests on an assumed expert skew of 1.3 (no per-rank "
                                          "load statistics in the paper); gives +12%"),
}


@pytest.mark.parametrize(
    "fig",
    [pytest.param(f, id=f.name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[f.name]))
     if f.name in KNOWN_MISSES else pytest.param(f, id=f.name) for f in FIGS],
)
def test_figure_within_band(fig):
    assert fig.within_band, f"{fig.name}: model {fig.model:.4g} vs paper {fig.paper:.4g} ({fig.rel_error:+.1%})"


def test_every_section_is_reproduced():
    sections = {f.section for f in FIGS}
    assert sections == {"prefill", "decode", "context cache", "model caching", "dispatch/combine"}
    assert sum(f.section == "decode" for f in FIGS) == 10   # five rows, TPOT and tok/s each
