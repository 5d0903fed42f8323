"""The router's instance choice (pure policy)."""

from matrixinfer.serve.router_policy import InstanceLoad, pick_instance


def test_least_loaded_wins_and_assignments_count():
    a = InstanceLoad("a", queued_tokens=100, kv_used=0, kv_total=10)
    b = InstanceLoad("b", queued_tokens=10, kv_used=0, kv_total=10)
    assert pick_instance([a, b]) == "b"
    b2 = InstanceLoad("b", queued_tokens=10, kv_used=0, kv_total=10, assigned_tokens=500)
    assert pick_instance([a, b2]) == "a"  # tokens sent since the last report count too


def test_kv_pressure_breaks_ties_and_dead_or_excluded_are_skipped():
    a = InstanceLoad("a", 0, kv_used=9, kv_total=10)
    b = InstanceLoad("b", 0, kv_used=1, kv_total=10)
    assert pick_instance([a, b]) == "b"
    assert pick_instance([a, b], exclude={"b"}) == "a"
    assert pick_instance([InstanceLoad("c", 0, 0, 1, alive=False)]) is None
    assert pick_instance([]) is None


def test_ties_go_to_the_first_listed():
    xs = [InstanceLoad(i, 0, 0, 1) for i in "xyz"]
    assert pick_instance(xs) == "x"
    assert pick_instance(xs[1:] + xs[:1]) == "y"
