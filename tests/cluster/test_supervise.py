"""The Ray driver's supervision decisions, on stand-in actors (no Ray cluster: fast)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="the cluster extra (pip install -e '.[cluster]') is not installed")

from ray.exceptions import ActorDiedError, GetTimeoutError  # noqa: E402

from matrixinfer.cluster.placement import GroupPlan  # noqa: E402
from matrixinfer.cluster.ray_backend import Instance, RayDeployment  # noqa: E402


class Call:
    def __init__(self, result):
        self.result = result


class FakeActor:
    """An actor handle whose info() answers ``answer`` (a dict, or an exception to raise)."""

    def __init__(self, answer):
        self.answer = answer
        self.info = self  # actor.info.remote()

    def remote(self):
        return Call(self.answer)


class FakeRay:
    def __init__(self):
        self.killed = []

    def get(self, call, timeout=None):
        if isinstance(call.result, Exception):
            raise call.result
        return call.result

    def kill(self, actor, no_restart=False):
        self.killed.append(actor)


def _deployment(instances):
    dep = RayDeployment.__new__(RayDeployment)  # no Ray connection: only the supervision state
    dep.ray, dep.instances, dep.restarted = FakeRay(), instances, []
    dep._start_ranks = lambda inst: dep.restarted.append(inst)
    return dep


def _inst(role, actors, pids):
    plan = GroupPlan(role, 0, len(actors), "STRICT_PACK", {"CPU": 1.0}, 1)
    return Instance(role, 0, plan, pg=None, actors=actors, pids=pids)


def test_a_new_process_behind_a_one_rank_actor_is_a_restart():
    inst = _inst("decode", [FakeActor({"pid": 12})], [11])
    dep = _deployment([inst])
    dep.supervise()
    assert (inst.restarts, inst.pids, dep.restarted) == (1, [12], [])
    dep.supervise()
    assert inst.restarts == 1  # the same process again: nothing new


def test_an_ep_instance_that_lost_a_rank_is_recreated_whole():
    actors = [FakeActor({"pid": 1}), FakeActor(ActorDiedError())]
    inst = _inst("prefill", actors, [1, 2])
    dep = _deployment([inst])
    dep.supervise()
    assert dep.restarted == [inst] and dep.ray.killed == actors and inst.restarts == 1


def test_a_rank_that_does_not_answer_is_not_yet_dead():
    inst = _inst("prefill", [FakeActor({"pid": 1}), FakeActor(GetTimeoutError())], [1, 2])
    dep = _deployment([inst])
    dep.supervise()
    assert dep.restarted == [] and inst.restarts == 0
