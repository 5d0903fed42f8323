"""From the planner's decision to a deployment spec (pure).

:func:`from_plan` turns :func:`matrixinfer.sim.planner.plan`'s recommendation into a
:class:`~matrixinfer.cluster.spec.DeploymentSpec`: pools, instance counts, ranks per instance (the
EP degree, one rank per die), the autoscaler's bounds (what the hardware holds with the other pool
at its minimum), EMS servers (one per host the plan uses, as the reference design pools those
hosts' DRAM) and the SLO. :func:`paper_deployment` is the reference design's own deployment
(1 decode instance of 160 NPUs = 320 ranks, 6 prefill instances of 16 NPUs = 32 ranks, EMS).
"""

from __future__ import annotations

import math

from matrixinfer.cluster.spec import Autoscale, DeploymentSpec, Ems, Hardware, Pool, Router, Slo, validate
from matrixinfer.sim.hardware import ClusterSpec
from matrixinfer.sim.planner import Plan, PlanRequest

EMS_DRAM_FRACTION = 0.5  # of a host's pool-able DRAM given to its EMS server
RANK_DRAM_FRACTION = 0.25  # of a host's DRAM requested by its engine rank processes together
CPUS_PER_RANK = 4.0


def _gib(n: float) -> str:
    return f"{max(1, int(n // (1 << 30)))}G"


def hardware_of(hw: ClusterSpec) -> Hardware:
    """The spec's view of a simulator cluster: hosts, ranks (dies) per host, the device resource."""
    resource = "nvidia.com/gpu" if "H" in hw.chip.name.split()[0] else "huawei.com/Ascend910"
    return Hardware(name=hw.name, nodes=hw.nodes, ranks_per_node=hw.chips_per_node * hw.chip.dies,
                    uniform_fabric=hw.uniform_fabric, accelerator_resource=resource,
                    ranks_per_device=hw.chip.dies)


def _pool(hw: ClusterSpec, instances: int, chips: int, max_instances: int, redundant: int) -> Pool:
    ranks = chips * hw.chip.dies
    per_node = hw.chips_per_node * hw.chip.dies
    rank_mem = hw.cpu_dram_per_node * RANK_DRAM_FRACTION / per_node
    return Pool(instances=instances, min_instances=1, max_instances=max(instances, max_instances), ranks=ranks,
                placement="pack", redundant_experts=redundant, cpus_per_rank=CPUS_PER_RANK,
                memory_per_rank=_gib(rank_mem))


def build_spec(hw: ClusterSpec, req: PlanRequest, n_prefill: int, prefill_chips: int, n_decode: int,
               decode_chips: int, decode_redundant: int = 0, prefill_redundant: int = 0,
               model: str | None = None, name: str = "matrixinfer") -> DeploymentSpec:
    """A spec for ``n_prefill`` x ``prefill_chips`` + ``n_decode`` x ``decode_chips`` on ``hw``."""
    max_p = (hw.chips - decode_chips) // prefill_chips
    max_d = (hw.chips - prefill_chips) // decode_chips
    used = n_prefill * prefill_chips + n_decode * decode_chips
    if used > hw.chips:
        raise ValueError(f"{n_prefill} x {prefill_chips} + {n_decode} x {decode_chips} chips do not fit "
                         f"{hw.name} ({hw.chips} chips)")
    hosts = math.ceil(used / hw.chips_per_node)
    spec = DeploymentSpec(
        name=name, model=model, hardware=hardware_of(hw),
        slo=Slo(ttft_ms=req.ttft_s * 1e3, tpot_ms=req.tpot_s * 1e3),
        prefill=_pool(hw, n_prefill, prefill_chips, max_p, prefill_redundant),
        decode=_pool(hw, n_decode, decode_chips, max_d, decode_redundant),
        ems=Ems(servers=hosts, capacity=_gib(hw.cpu_dram_per_node * EMS_DRAM_FRACTION), cpus=8.0),
        router=Router(cpus=4.0, memory="8G"), autoscale=Autoscale())
    return validate(spec, f"plan for {hw.name}")


def from_plan(pl: Plan, hw: ClusterSpec, req: PlanRequest, model: str | None = None) -> DeploymentSpec:
    """The planner's recommendation as a spec."""
    return build_spec(hw, req, pl.n_prefill, pl.prefill.chips, pl.n_decode, pl.decode.chips,
                      decode_redundant=pl.decode.redundant, prefill_redundant=32 if pl.prefill.dies >= 32 else 0,
                      model=model)


def paper_deployment(hw: ClusterSpec, req: PlanRequest, model: str | None = None) -> DeploymentSpec:
    """The reference design's deployment: 1 x decode(160 NPUs, EP320, 32 shared-expert dies, one
    expert per die) + 6 x prefill(16 NPUs, EP32), EMS on those hosts' DRAM."""
    return build_spec(hw, req, 6, 16, 1, 160, decode_redundant=32, prefill_redundant=32, model=model,
                      name="cloudmatrix-infer")
