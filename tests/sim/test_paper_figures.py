"""`simulate paper`: every figure within its band of the paper's (10%; model caching 20%).

Figures the honest cost model does not yet reach are listed in KNOWN_MISSES with the reason;
they are strict xfails, so a model change that brings one into band fails until it is removed
from the list (and one that pushes a passing figure out of band fails outright).
"""

import pytest

from matrixinfer.sim.paper import reproduce_paper
from matrixinfer.sim.shapes import deepseek_r1

FIGS = reproduce_paper(deepseek_r1())

_DECODE = ("decode at batch >= 24 runs 23-35% faster than measured: the model has no term for "
           "the per-layer cost the paper's own numbers imply beyond FLOPs/bytes/measured "
           "operators (see docs/simulator.md, 'Known gaps')")
_CACHE = ("context-cache gains come out larger than measured: computing only the uncached "
          "suffix scales time almost linearly, the paper's runs show a ~1/3 fixed share")
KNOWN_MISSES = {
    "TPOT, 1024/1024 batch 128": _DECODE, "tok/s/NPU, 1024/1024 batch 128": _DECODE,
    "TPOT, 2048/256 batch 112": _DECODE, "tok/s/NPU, 2048/256 batch 112": _DECODE,
    "TPOT, 4096/256 batch 96": _DECODE, "tok/s/NPU, 4096/256 batch 96": _DECODE,
    "TPOT, 4096/256 batch 24": _DECODE, "tok/s/NPU, 4096/256 batch 24": _DECODE,
    "TTFT reduction at 50% reuse": _CACHE, "throughput gain at 50% reuse": _CACHE,
    "TTFT reduction at 90% reuse": _CACHE, "throughput gain at 90% reuse": _CACHE,
    "tok/s/NPU, default expert balance": "assumed 1.3 expert skew gives +12%",
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
