"""Where an instance's ranks go on a Ray cluster (pure).

The simulator's topology-aware allocator (:func:`matrixinfer.sim.allocator.allocate`, MatrixResource's
role) places every instance of the spec on the spec's hardware; an instance it puts on one host
becomes a ``STRICT_PACK`` placement group (all ranks on one node, or none), one it must spread over
adjacent hosts a ``PACK`` group (as few nodes as possible), and a pool marked ``placement: spread`` a
``SPREAD`` group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from matrixinfer.cluster.spec import DeploymentSpec
from matrixinfer.sim.allocator import InstanceRequest, allocate


@dataclass(frozen=True)
class GroupPlan:
    """One instance's placement group: ``ranks`` bundles of ``bundle`` resources, with ``strategy``."""

    role: str
    index: int
    ranks: int
    strategy: str  # STRICT_PACK | PACK | SPREAD
    bundle: dict[str, float]
    hosts: int  # hosts the allocator put the instance on (0: it did not fit the spec's hardware)


def group_plans(spec: DeploymentSpec) -> list[GroupPlan]:
    """A placement group per instance of both pools, as the allocator places them on the spec's hardware."""
    hw = spec.hardware
    chips_per_node = hw.ranks_per_node // hw.ranks_per_device
    reqs = []
    for role in ("prefill", "decode"):
        pool = spec.pool(role)
        for i in range(pool.instances):
            reqs.append(InstanceRequest(f"{role}{i}", math.ceil(pool.ranks / hw.ranks_per_device),
                                        contiguous=pool.placement == "pack"))
    alloc = allocate(reqs, hw.nodes, chips_per_node)
    out = []
    for role in ("prefill", "decode"):
        pool = spec.pool(role)
        bundle = {"CPU": pool.cpus_per_rank}
        if hw.accelerator_resource == "nvidia.com/gpu":
            bundle["GPU"] = 1.0 / hw.ranks_per_device
        for i in range(pool.instances):
            hosts = len(alloc.nodes_of(f"{role}{i}"))
            out.append(GroupPlan(role, i, pool.ranks, strategy(spec, role, hosts), bundle, hosts))
    return out


def strategy(spec: DeploymentSpec, role: str, hosts: int) -> str:
    """The placement-group strategy of a ``role`` instance the allocator put on ``hosts`` hosts."""
    if spec.pool(role).placement == "spread":
        return "SPREAD"
    if hosts == 1 or (hosts == 0 and spec.nodes_per_instance(role) == 1):
        return "STRICT_PACK"
    return "PACK"
