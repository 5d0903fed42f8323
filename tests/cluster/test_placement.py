"""Placement groups from the simulator's allocator (pure)."""

from __future__ import annotations

import msgspec

from matrixinfer.cluster.placement import group_plans
from matrixinfer.cluster.planning import paper_deployment
from matrixinfer.cluster.spec import DeploymentSpec, Hardware, Pool
from matrixinfer.sim.hardware import CLOUDMATRIX384
from matrixinfer.sim.planner import PlanRequest


def test_instances_that_fit_a_host_are_strict_packed():
    spec = DeploymentSpec(hardware=Hardware(nodes=2, ranks_per_node=2),
                          prefill=Pool(ranks=2, cpus_per_rank=1.5), decode=Pool(instances=2, max_instances=2))
    plans = {(p.role, p.index): p for p in group_plans(spec)}
    assert (plans["prefill", 0].strategy, plans["prefill", 0].ranks, plans["prefill", 0].hosts) == ("STRICT_PACK", 2, 1)
    assert plans["prefill", 0].bundle == {"CPU": 1.5}
    assert [plans["decode", i].strategy for i in (0, 1)] == ["STRICT_PACK"] * 2


def test_paper_deployment_packs_across_adjacent_hosts():
    spec = paper_deployment(CLOUDMATRIX384, PlanRequest(2.0, 0.05, 4096, 256))
    plans = group_plans(spec)
    decode = [p for p in plans if p.role == "decode"]
    prefill = [p for p in plans if p.role == "prefill"]
    assert [(p.strategy, p.hosts, p.ranks) for p in decode] == [("PACK", 20, 320)]  # 160 NPUs on 20 hosts
    assert {(p.strategy, p.hosts, p.ranks) for p in prefill} == {("PACK", 2, 32)}
    spread = msgspec.structs.replace(spec, prefill=msgspec.structs.replace(spec.prefill, placement="spread"))
    assert {p.strategy for p in group_plans(spread) if p.role == "prefill"} == {"SPREAD"}
