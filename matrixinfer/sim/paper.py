"""Reproduce the paper's experiments with the cost model and set them beside the paper's figures.

The paper's numbers below are the *comparison targets* only; none of them feeds the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from matrixinfer.sim.decode import DecodeConfig, decode_step
from matrixinfer.sim.expert_skew import measured_prefill_skew
from matrixinfer.sim.hardware import ASCEND_910C, CLOUDMATRIX384
from matrixinfer.sim.measurements import ASCEND_PROFILE
from matrixinfer.sim.model_loading import model_loading_table
from matrixinfer.sim.operators import Die, combine_time, dispatch_time
from matrixinfer.sim.prefill import PrefillConfig, prefill_step
from matrixinfer.sim.shapes import ModelShapes

# (batch per NPU, prompt, output, TPOT ms, tok/s per NPU) [paper §8]
DECODE_ROWS = ((128, 1024, 1024, 46.8, 2733), (112, 2048, 256, 47.4, 2360),
               (96, 4096, 256, 49.4, 1943), (24, 4096, 256, 24.6, 974),
               (8, 4096, 256, 14.9, 538))


@dataclass(frozen=True)
class PaperFigure:
    """One figure: the paper's value, the model's, and the accepted relative band."""

    section: str
    name: str
    paper: float
    model: float
    unit: str = ""
    band: float = 0.10
    note: str = ""
    measured: bool = True  # False: the paper's own projection, listed but not a test of the model

    @property
    def rel_error(self) -> float:
        return (self.model - self.paper) / self.paper

    @property
    def within_band(self) -> bool:
        return abs(self.rel_error) <= self.band


def ascend_die() -> Die:
    return Die(ASCEND_910C, ASCEND_PROFILE)


def paper_prefill(shapes: ModelShapes, reuse: float = 0.0, over_ub: bool = True,
                  imbalance: float = 1.0, pool_path_bw: float | None = None):
    """The paper's prefill setup: 16 NPUs (32 dies), EP32, 16K tokens per NPU, 4K prompts.

    Cached KV loads at the link's rate (UB or the VPC share per die), or, with ``pool_path_bw``
    (a measured EMS get rate per client), at the slower of that and the link."""
    pool = CLOUDMATRIX384.cpu_pool_bw_per_die if over_ub else \
        CLOUDMATRIX384.vpc_bw_per_node / (CLOUDMATRIX384.chips_per_node * ASCEND_910C.dies)
    if pool_path_bw is not None:
        pool = min(pool, pool_path_bw)
    return prefill_step(ascend_die(), shapes, PrefillConfig(
        dies=32, tp=32, tokens_per_chip=16384, prompt_len=4096, reuse=reuse,
        pool_bw_per_die=pool, imbalance=imbalance))


def paper_decode(shapes: ModelShapes, batch: float, prompt: int, output: int):
    """The paper's decode instance: 160 NPUs (EP320), MTP at 70% acceptance."""
    return decode_step(ascend_die(), shapes, DecodeConfig(
        dies=320, batch_per_chip=batch, context=prompt + output / 2))


def reproduce_paper(shapes: ModelShapes, pool_path_bw: float | None = None) -> list[PaperFigure]:
    """Every figure `matrixinfer simulate paper` prints, model beside paper.

    ``pool_path_bw``: the profile-informed variant, cached KV loaded at a measured EMS get rate
    (B/s per client) where it is slower than the link; None is the analytic model."""
    figs: list[PaperFigure] = []
    # the default (static) placement's skew, from measured routing (sim/expert_skew.py); perfect: 1.0
    skew = measured_prefill_skew()
    default = paper_prefill(shapes, imbalance=skew)
    perfect = paper_prefill(shapes, imbalance=1.0)
    figs.append(PaperFigure("prefill", "tok/s/NPU, default expert balance", 5655,
                            default.tokens_per_s_per_chip, "tok/s",
                            note=f"skew {skew:.2f} from measured routing"))
    # [paper §5] only the default-balance figure was measured; 6,688 is the paper's projection
    figs.append(PaperFigure("prefill", "tok/s/NPU, perfect expert balance", 6688,
                            perfect.tokens_per_s_per_chip, "tok/s", note="paper's projection",
                            measured=False))
    for batch, prompt, output, tpot, tput in DECODE_ROWS:
        r = paper_decode(shapes, batch, prompt, output)
        label = f"{prompt}/{output} batch {batch}"
        figs.append(PaperFigure("decode", f"TPOT, {label}", tpot, r.tpot * 1e3, "ms"))
        figs.append(PaperFigure("decode", f"tok/s/NPU, {label}", tput,
                                r.tokens_per_s_per_chip, "tok/s"))
    # Baselines as the paper states them: the 1.42x throughput gain is 12.5% -> 50% reuse, the
    # 2.28x gain is over no cache. The TTFT cuts are read as relative to no cache: with that
    # reading the paper's own numbers agree with each other (a 34% cut at 50% and the 1.42x gain
    # put 12.5% reuse at 0.94 of the no-cache time; a 12.5% baseline would imply 1.52x).
    bw = pool_path_bw
    nocache = paper_prefill(shapes, 0.0)
    low = paper_prefill(shapes, 0.125, pool_path_bw=bw)
    for reuse, ttft_cut, gain, base, base_label in ((0.5, 0.34, 1.42, low, "vs 12.5% reuse"),
                                                    (0.9, 0.59, 2.28, nocache, "vs no cache")):
        r = paper_prefill(shapes, reuse, pool_path_bw=bw)
        pct = int(reuse * 100)
        figs.append(PaperFigure("context cache", f"TTFT reduction at {pct}% reuse", ttft_cut * 100,
                                (1 - r.batch_time / nocache.batch_time) * 100, "%",
                                note="vs no cache"))
        figs.append(PaperFigure("context cache", f"throughput gain at {pct}% reuse", gain,
                                r.tokens_per_s_per_chip / base.tokens_per_s_per_chip, "x",
                                note=base_label))
    ub, vpc = paper_prefill(shapes, 0.9, True, pool_path_bw=bw), paper_prefill(shapes, 0.9, False, pool_path_bw=bw)
    figs.append(PaperFigure("context cache", "pool over UB vs VPC, 90% reuse", 1.52,
                            vpc.batch_time / ub.batch_time, "x", note="paper: 'up to'"))
    table = {s.name: s for s in model_loading_table(shapes.weight_bytes(), instances=8)}
    for label, key, attr, paper in (
        ("cold start, no cache", "no cache", "cold_start_s", 2560),
        ("cold start, local DRAM", "local DRAM cache", "cold_start_s", 2560),
        ("cold start, EMS", "EMS pool", "cold_start_s", 320),
        ("warm start, local DRAM", "local DRAM cache", "warm_start_s", 5),
        ("warm start, EMS", "EMS pool", "warm_start_s", 5),
        ("model switch, no cache", "no cache", "switch_s", 320),
        ("model switch, local DRAM", "local DRAM cache", "switch_s", 281),
        ("model switch, EMS", "EMS pool", "switch_s", 5),
    ):
        figs.append(PaperFigure("model caching", label, paper, getattr(table[key], attr), "s",
                                band=0.20))
    die = ascend_die()
    measured_d = {8: 116, 32: 133, 128: 152, 256: 152}
    measured_c = {8: 118, 32: 146, 128: 150, 256: 149}
    for ep in (8, 32, 128, 256):
        figs.append(PaperFigure("dispatch/combine", f"dispatch EP{ep}, 128 tok/rank",
                                measured_d[ep], dispatch_time(die, ep, 128) * 1e6, "us",
                                note="calibration input"))
        figs.append(PaperFigure("dispatch/combine", f"combine EP{ep}, 128 tok/rank",
                                measured_c[ep], combine_time(die, ep, 128) * 1e6, "us",
                                note="calibration input"))
    return figs


def _status(f: PaperFigure) -> str:
    return "proj" if not f.measured else ("yes" if f.within_band else "NO")


def format_figures(figs: list[PaperFigure], informed: list[PaperFigure] | None = None,
                   informed_label: str = "") -> str:
    """Side-by-side table: section, figure, paper, model, error, band status; with ``informed``
    (the same figures, profile-informed) a second model column and its error and status."""
    extra = f"{'profile':>10}{'error':>8}  ok   " if informed else ""
    lines = [f"{'section':<17}{'figure':<36}{'paper':>10}{'model':>10}{'error':>8}  ok   {extra}note",
             "-" * (100 + (24 if informed else 0))]
    for i, f in enumerate(figs):
        fmt = "{:>10.2f}" if f.unit == "x" else "{:>10.1f}" if f.paper < 100 else "{:>10.0f}"
        line = (f"{f.section:<17}{f.name:<36}" + fmt.format(f.paper) + fmt.format(f.model)
                + f"{f.rel_error:>+8.1%}  {_status(f):<4} ")
        if informed:
            g = informed[i]
            line += fmt.format(g.model) + f"{g.rel_error:>+8.1%}  {_status(g):<4} "
        lines.append((line + f"{f.unit} {f.note}").rstrip())
    judged = [f for f in figs if f.measured]
    lines.append("-" * (100 + (24 if informed else 0)))
    lines.append(f"{sum(f.within_band for f in judged)}/{len(judged)} measured figures within band "
                 f"(10%; model caching 20%); {len(figs) - len(judged)} projection(s) listed, not judged")
    if informed:
        ok = sum(f.within_band for f in informed if f.measured)
        lines.append(f"profile-informed ({informed_label}): {ok}/{len(judged)} within band")
    return "\n".join(lines)
