"""Deployment planner: instance sizes, counts, EP degree, redundant experts and batch for an SLO.

Pure: it enumerates candidate prefill and decode instances, prices each with the step models,
keeps those that meet the TTFT/TPOT targets and fit in memory, then splits the hardware between
the pools so that prefill and decode capacity match the workload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from matrixinfer.sim.decode import DecodeConfig, decode_step
from matrixinfer.sim.hardware import ClusterSpec
from matrixinfer.sim.measurements import profile_for
from matrixinfer.sim.operators import Die
from matrixinfer.sim.prefill import PrefillConfig, prefill_step
from matrixinfer.sim.shapes import ModelShapes

BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256)
PREFILL_TOKENS = (2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks for: SLOs (seconds), workload and hardware price per chip-hour."""

    ttft_s: float
    tpot_s: float
    prompt: int
    output: int
    reuse: float = 0.0
    price_per_chip_hour: float = 2.0


@dataclass(frozen=True)
class DecodeOption:
    chips: int
    dies: int
    redundant: int
    shared_dies: int
    batch_per_chip: int
    tpot_s: float
    tok_s_per_chip: float


@dataclass(frozen=True)
class PrefillOption:
    chips: int
    dies: int
    tp: int
    tokens_per_chip: int
    ttft_s: float
    tok_s_per_chip: float


@dataclass(frozen=True)
class Plan:
    """A full deployment: pools, counts, throughput and cost."""

    prefill: PrefillOption
    n_prefill: int
    decode: DecodeOption
    n_decode: int
    requests_per_s: float
    output_tok_s: float
    chips_used: int
    cost_per_m_output: float
    runner_ups: list[Plan] = field(default_factory=list)

    @property
    def output_tok_s_per_chip(self) -> float:
        return self.output_tok_s / max(self.chips_used, 1)


def _instance_sizes(hw: ClusterSpec, largest: int) -> list[int]:
    sizes = [n for n in (4, 8, 16, 32, 64, 128, 144, 160, 192, 256) if n <= min(largest, hw.chips)]
    if not hw.uniform_fabric:
        sizes = [n for n in sizes if n % hw.chips_per_node == 0 or n < hw.chips_per_node]
    return sizes or [hw.chips]


def decode_options(shapes: ModelShapes, hw: ClusterSpec, req: PlanRequest) -> list[DecodeOption]:
    """Every decode instance shape and batch that meets the TPOT target, best tok/s first."""
    die = Die(hw.chip, profile_for(hw.chip.name))
    context = req.prompt + req.output / 2
    out: list[DecodeOption] = []
    for chips in _instance_sizes(hw, hw.chips):
        dies = chips * hw.chip.dies
        for redundant in (0, 32):
            spare = dies - shapes.routed_experts - redundant
            shared = spare if 0 < spare <= dies // 4 else 0
            if dies - shared <= 0:
                continue
            for batch in BATCHES:
                cfg = DecodeConfig(dies=dies, batch_per_chip=batch, context=context,
                                   redundant_experts=redundant, shared_expert_dies=shared)
                r = decode_step(die, shapes, cfg)
                if r.fits and r.tpot <= req.tpot_s:
                    out.append(DecodeOption(chips, dies, redundant, shared, batch, r.tpot,
                                            r.tokens_per_s_per_chip))
    out.sort(key=lambda o: (-o.tok_s_per_chip, o.chips))
    return out


def prefill_options(shapes: ModelShapes, hw: ClusterSpec, req: PlanRequest) -> list[PrefillOption]:
    """Every prefill instance shape and batch whose batch time meets the TTFT target."""
    die = Die(hw.chip, profile_for(hw.chip.name))
    pool_bw = hw.cpu_pool_bw_per_die if hw.uniform_fabric else \
        hw.vpc_bw_per_node / (hw.chips_per_node * hw.chip.dies)
    out: list[PrefillOption] = []
    for chips in _instance_sizes(hw, 32):
        dies = chips * hw.chip.dies
        tps = (dies,) if hw.uniform_fabric else (1,)
        for tp in tps:
            for tokens in PREFILL_TOKENS:
                if tokens * chips < req.prompt:
                    continue
                cfg = PrefillConfig(dies=dies, tp=tp, tokens_per_chip=tokens,
                                    prompt_len=req.prompt, reuse=req.reuse,
                                    pool_bw_per_die=pool_bw,
                                    redundant_experts=32 if dies >= 32 else 0)
                r = prefill_step(die, shapes, cfg)
                if r.fits and r.batch_time <= req.ttft_s:
                    out.append(PrefillOption(chips, dies, tp, tokens, r.batch_time,
                                             r.tokens_per_s_per_chip))
    out.sort(key=lambda o: (-o.tok_s_per_chip, o.chips))
    return out


def split_pools(hw_chips: int, p: PrefillOption, d: DecodeOption, req: PlanRequest,
                ) -> tuple[int, int, float]:
    """Instance counts (prefill, decode) and request rate that use the chips best."""
    p_rps = p.tok_s_per_chip * p.chips / req.prompt
    d_rps = d.tok_s_per_chip * d.chips / req.output
    best = (0, 0, 0.0)
    for n_d in range(1, hw_chips // d.chips + 1):
        n_p = (hw_chips - n_d * d.chips) // p.chips
        if n_p < 1:
            break
        rate = min(n_p * p_rps, n_d * d_rps)
        # trim prefill instances that would sit idle
        while n_p > 1 and (n_p - 1) * p_rps >= rate:
            n_p -= 1
        if rate > best[2] + 1e-9:
            best = (n_p, n_d, rate)
    return best


def plan(shapes: ModelShapes, hw: ClusterSpec, req: PlanRequest, runner_ups: int = 3) -> Plan:
    """Recommend a deployment; raises ValueError when no configuration meets the targets."""
    decodes = decode_options(shapes, hw, req)
    prefills = prefill_options(shapes, hw, req)
    if not decodes:
        raise ValueError(f"plan: no decode configuration on {hw.name} meets TPOT "
                         f"{req.tpot_s * 1e3:.1f} ms (or the model does not fit)")
    if not prefills:
        raise ValueError(f"plan: no prefill configuration on {hw.name} meets TTFT "
                         f"{req.ttft_s * 1e3:.0f} ms")
    # best batch per decode shape, best batch per prefill shape
    seen_d: dict[tuple, DecodeOption] = {}
    for d in decodes:
        seen_d.setdefault((d.chips, d.redundant), d)
    seen_p: dict[tuple, PrefillOption] = {}
    for p in prefills:
        seen_p.setdefault((p.chips, p.tp), p)
    plans: list[Plan] = []
    for d in seen_d.values():
        for p in seen_p.values():
            n_p, n_d, rate = split_pools(hw.chips, p, d, req)
            if rate <= 0:
                continue
            chips = n_p * p.chips + n_d * d.chips
            out_tok = rate * req.output
            cost = req.price_per_chip_hour * chips / (out_tok * 3600) * 1e6
            plans.append(Plan(p, n_p, d, n_d, rate, out_tok, chips, cost))
    if not plans:
        raise ValueError(f"plan: {hw.name} ({hw.chips} chips) cannot hold one prefill and one "
                         "decode instance that meet the targets")
    plans.sort(key=lambda pl: (-pl.output_tok_s_per_chip, pl.chips_used))
    best = plans[0]
    return Plan(best.prefill, best.n_prefill, best.decode, best.n_decode, best.requests_per_s,
                best.output_tok_s, best.chips_used, best.cost_per_m_output,
                runner_ups=plans[1:1 + runner_ups])


def format_plan(pl: Plan, hw: ClusterSpec) -> str:
    """Human-readable recommendation plus runner-ups."""
    def one(p: Plan, tag: str) -> list[str]:
        d, f = p.decode, p.prefill
        return [
            f"{tag}: {p.n_prefill} x prefill({f.chips} chips, {f.dies} ranks, EP{f.dies}, TP{f.tp}, "
            f"{f.tokens_per_chip} tok/chip, batch {f.ttft_s * 1e3:.0f} ms, "
            f"{f.tok_s_per_chip:,.0f} tok/s/chip) + {p.n_decode} x decode({d.chips} chips, "
            f"EP{d.dies}, {d.redundant} redundant, {d.shared_dies} shared-expert ranks, "
            f"batch {d.batch_per_chip}/chip, TPOT {d.tpot_s * 1e3:.1f} ms, "
            f"{d.tok_s_per_chip:,.0f} tok/s/chip)",
            f"    {p.chips_used}/{hw.chips} chips, {p.requests_per_s:,.1f} req/s, "
            f"{p.output_tok_s:,.0f} output tok/s ({p.output_tok_s_per_chip:,.0f}/chip), "
            f"${p.cost_per_m_output:.3f} per M output tokens",
        ]
    lines = one(pl, "recommended")
    for i, r in enumerate(pl.runner_ups, 1):
        lines += one(r, f"runner-up {i}")
    return "\n".join(lines)
