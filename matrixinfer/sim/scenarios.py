"""Ready-made deployments for the discrete-event simulation, built from the step models."""

from __future__ import annotations

from matrixinfer.sim.decode import DecodeConfig, decode_step
from matrixinfer.sim.des import Deployment, Workload
from matrixinfer.sim.hardware import CLOUDMATRIX384
from matrixinfer.sim.paper import ascend_die
from matrixinfer.sim.prefill import PrefillConfig, prefill_step
from matrixinfer.sim.shapes import ModelShapes


def paper_deployment(shapes: ModelShapes, prompt: int = 4096, output: int = 256,
                     decode_batch_per_chip: int = 96, prefill_instances: int = 6,
                     decode_chips: int = 160, prefill_chips: int = 16,
                     reuse: float = 0.0) -> Deployment:
    """The paper's supernode split: 6 prefill instances of 16 NPUs, 1 decode instance of 160."""
    die = ascend_die()
    context = prompt + output / 2

    def ptime(tokens: int) -> float:
        cfg = PrefillConfig(dies=prefill_chips * 2, tp=prefill_chips * 2,
                            tokens_per_chip=max(tokens / prefill_chips, 1.0), prompt_len=prompt,
                            reuse=reuse, pool_bw_per_die=CLOUDMATRIX384.cpu_pool_bw_per_die)
        return prefill_step(die, shapes, cfg).batch_time

    def dtime(running: int) -> float:
        per_chip = max(running / decode_chips, 1.0 / decode_chips)
        cfg = DecodeConfig(dies=decode_chips * 2, batch_per_chip=per_chip, context=context)
        return decode_step(die, shapes, cfg).step_time

    return Deployment(
        prefill_instances=prefill_instances, prefill_chips=prefill_chips,
        prefill_batch_tokens=16384 * prefill_chips, prefill_time=ptime,
        decode_instances=1, decode_chips=decode_chips,
        decode_max_batch=decode_batch_per_chip * decode_chips, decode_time=dtime,
        acceptance=0.70,
        kv_transfer_s=prompt * shapes.kv_bytes_per_token() / (CLOUDMATRIX384.chip.scaleout_bw),
    )


def saturating_rate(shapes: ModelShapes, dep: Deployment, output: int) -> float:
    """Requests/s that keep the decode pool at its max batch in steady state (step model)."""
    step = dep.decode_time(dep.decode_max_batch)
    tokens_per_step = 1.0 + dep.acceptance
    per_request = output / tokens_per_step * step
    return dep.decode_instances * dep.decode_max_batch / per_request


def paper_decode_load(shapes: ModelShapes) -> tuple[Deployment, Workload]:
    """The paper's decode load (batch 96/NPU, 4K prompt, 256 output) with enough prefill to feed it.

    Prefill is sized (not the paper's six instances) so that decode, the pool under test,
    saturates; arrivals run 2% above decode capacity so the batch stays full.
    """
    probe = paper_deployment(shapes)
    rate = saturating_rate(shapes, probe, 256) * 1.02
    per_inst = 16384 * 16 / probe.prefill_time(16384 * 16) / 4096
    instances = int(rate / per_inst) + 2
    dep = paper_deployment(shapes, prefill_instances=instances)
    return dep, Workload(rate=rate, prompt=4096, output=256)
