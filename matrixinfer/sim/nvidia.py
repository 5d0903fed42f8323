"""DeepSeek-R1 on NVIDIA H800/H100/H200: the same cost model with the Hopper catalog entries."""

from __future__ import annotations

from dataclasses import dataclass

from matrixinfer.sim.decode import DecodeConfig, decode_step
from matrixinfer.sim.expert_skew import measured_prefill_skew
from matrixinfer.sim.hardware import CHIPS
from matrixinfer.sim.measurements import NVIDIA_PROFILE
from matrixinfer.sim.operators import Die
from matrixinfer.sim.planner import BATCHES
from matrixinfer.sim.prefill import PrefillConfig, prefill_step
from matrixinfer.sim.shapes import ModelShapes

# Deployment shapes DeepSeek published for H800 (inference-system overview, Feb 2025):
# prefill EP32 over 4 nodes with DP attention; decode EP144 over 18 nodes, 32 redundant experts.
PREFILL_GPUS = 32
GPUS_PER_NODE = 8  # HGX: NVLink inside a node, one 400 Gb/s NIC per GPU between nodes
DECODE_GPUS = 144


@dataclass(frozen=True)
class NvidiaPrediction:
    gpu: str
    phase: str
    tok_s_per_gpu: float
    inputs: str


def predict(shapes: ModelShapes, gpus: tuple[str, ...] = ("h800", "h100"),
            tpot_target_s: float = 0.050, prompt: int = 4096, output: int = 256,
            ) -> list[NvidiaPrediction]:
    """Prefill (4K prompts) and decode (largest batch under ``tpot_target_s``) per GPU."""
    out: list[NvidiaPrediction] = []
    for key in gpus:
        chip = CHIPS[key]
        die = Die(chip, NVIDIA_PROFILE)
        for label, skew in (("default balance", measured_prefill_skew()), ("perfect balance", 1.0)):
            prefill = prefill_step(die, shapes, PrefillConfig(dies=PREFILL_GPUS, tp=1, tokens_per_chip=16384,
                                                              prompt_len=prompt, imbalance=skew,
                                                              dies_per_node=GPUS_PER_NODE))
            out.append(NvidiaPrediction(
                chip.name, f"prefill ({label})", prefill.tokens_per_s_per_chip,
                f"EP{PREFILL_GPUS}, DP attention, 16384 tok/GPU, {prompt}-token prompts, "
                f"FP8 GEMM, RDMA once per remote node, skew {skew:.2f}"))
        best = None
        for batch in BATCHES:
            cfg = DecodeConfig(dies=DECODE_GPUS, batch_per_chip=batch, context=prompt + output / 2,
                               redundant_experts=32, shared_expert_dies=0)
            r = decode_step(die, shapes, cfg)
            if r.fits and r.tpot <= tpot_target_s and (best is None or
                                                      r.tokens_per_s_per_chip > best[1].tokens_per_s_per_chip):
                best = (batch, r)
        if best is not None:
            batch, r = best
            out.append(NvidiaPrediction(
                chip.name, "decode", r.tokens_per_s_per_chip,
                f"EP{DECODE_GPUS}, 32 redundant, batch {batch}/GPU, context {prompt + output // 2}, "
                f"MTP 70%, TPOT {r.tpot * 1e3:.1f} ms (target {tpot_target_s * 1e3:.0f})"))
    return out


def format_predictions(preds: list[NvidiaPrediction]) -> str:
    lines = [f"{'GPU':<10}{'phase':<26}{'tok/s/GPU':>10}  inputs", "-" * 100]
    for p in preds:
        lines.append(f"{p.gpu:<10}{p.phase:<26}{p.tok_s_per_gpu:>10,.0f}  {p.inputs}")
    return "\n".join(lines)
