"""--cpu-bind: which CPUs an engine thread's OpenMP team is pinned to, and the pinning itself."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from matrixinfer import kernels
from matrixinfer.config import EngineConfig
from matrixinfer.engine import cpu_affinity
from matrixinfer.engine.cpu_affinity import parse_cpu_list, serving_threads, team_cpus


def test_auto_pins_only_a_team_that_takes_every_core_or_all_but_one_nobody_holds():
    assert team_cpus("auto", 2, [0, 1]) == [0, 1]
    assert team_cpus("auto", 4, [3, 1, 2, 0]) == [0, 1, 2, 3]
    assert team_cpus("auto", 1, [0, 1]) is None  # a worker sharing the host's cores (P/D, EP ranks)
    assert team_cpus("auto", 1, [0]) is None  # a team of one has no worker to wake
    assert team_cpus("auto", 2, [0, 1, 2, 3]) is None  # other engines of the host may use the rest
    assert team_cpus("auto", 3, [3, 1, 2, 0]) == [0, 1, 2]  # the colocated server's: a core left to its API
    assert team_cpus("auto", 2, [0, 1], claimed=[1]) is None  # another engine thread of this process holds them
    assert team_cpus("none", 2, [0, 1]) is None


def test_explicit_lists_and_their_errors():
    assert parse_cpu_list("0-2,5") == [0, 1, 2, 5]
    assert parse_cpu_list("3, 1,3") == [3, 1]
    assert team_cpus("1", 2, [0, 1]) == [1]  # two threads on one CPU: what was asked for
    with pytest.raises(ValueError, match="not among"):
        team_cpus("0,7", 2, [0, 1])
    for bad in ("x", "2-1", "-1", "0,,1", "auto,1"):
        with pytest.raises(ValueError, match="cpu_bind"):
            EngineConfig(cpu_bind=bad)
    assert EngineConfig(cpu_bind="0-1").cpu_bind == "0-1"


@pytest.mark.skipif(not kernels.available() or not hasattr(os, "sched_getaffinity"),
                    reason="needs the native kernels and Linux CPU affinity")
def test_pinning_sets_each_team_threads_affinity_and_is_released():
    """A thread's team pinned to CPU 0 (both threads on it): the thread's own affinity is {0}, its
    parallel regions run on CPU 0 only, and the claim is released for the next engine thread."""
    seen: dict[str, object] = {}

    def engine_thread() -> None:
        torch.set_num_threads(2)
        cpus = cpu_affinity.bind_engine_thread("0", 2)
        seen["cpus"] = cpus
        seen["affinity"] = os.sched_getaffinity(0)
        seen["claimed"] = set(cpu_affinity._claimed)
        cpu_affinity.release(cpus)

    before = os.sched_getaffinity(0)
    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen["cpus"] == [0] and seen["affinity"] == {0} and seen["claimed"] == {0}
    assert cpu_affinity._claimed == set()
    assert os.sched_getaffinity(0) == before  # the calling thread (another team) is untouched


def test_the_colocated_server_leaves_one_core_to_its_api():
    assert [serving_threads(c) for c in (1, 2, 4, 16)] == [1, 1, 3, 15]
