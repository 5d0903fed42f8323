"""Topology-aware allocator: chips as die pairs, contiguity, failed nodes, re-planning."""

from matrixinfer.sim.allocator import InstanceRequest, allocate, replan

PAPER = [InstanceRequest("decode", 160)] + [InstanceRequest(f"prefill{i}", 16) for i in range(6)]


def test_paper_layout_fits_one_supernode_contiguously():
    a = allocate(PAPER, nodes=48, chips_per_node=8)
    assert not a.unplaced
    nodes = a.nodes_of("decode")
    assert len(a.placements["decode"]) == 160 and nodes == list(range(nodes[0], nodes[0] + 20))
    used = [slot for slots in a.placements.values() for slot in slots]
    assert len(used) == len(set(used)) == 256          # no chip (die pair) is shared


def test_failed_nodes_are_avoided_and_replanned():
    a = allocate(PAPER, 48, 8)
    dead = frozenset({a.nodes_of("decode")[3]})
    b = replan(a, PAPER, 48, 8, dead)
    assert not b.unplaced
    assert not set(b.nodes_of("decode")) & dead
    for i in range(6):                                   # untouched instances stay put
        assert b.placements[f"prefill{i}"] == a.placements[f"prefill{i}"]


def test_contiguous_window_skips_gaps_and_reports_what_cannot_fit():
    a = allocate([InstanceRequest("big", 24)], nodes=6, chips_per_node=8, failed=frozenset({2}))
    assert a.nodes_of("big") == [3, 4, 5]
    b = allocate([InstanceRequest("huge", 32)], nodes=6, chips_per_node=8, failed=frozenset({2}))
    assert b.unplaced == ["huge"]
    c = allocate([InstanceRequest("loose", 32, contiguous=False)], 6, 8, frozenset({2}))
    assert not c.unplaced and 2 not in c.nodes_of("loose")


def test_small_instances_pack_into_partly_used_nodes():
    reqs = [InstanceRequest("a", 4), InstanceRequest("b", 4), InstanceRequest("c", 8)]
    a = allocate(reqs, nodes=2, chips_per_node=8)
    assert not a.unplaced
    assert a.nodes_of("a") == a.nodes_of("b")
