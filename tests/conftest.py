"""Shared fixtures: tiny checkpoints written once per session by transformers itself, and
network-namespace hosts for the multi-host tests."""

from __future__ import annotations

import os

import pytest

from tests.checkpoints import make_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory):
    """A tiny random DeepseekV3ForCausalLM checkpoint (q LoRA, 2 expert groups)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_v3"), "v3")


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory):
    """A tiny random DeepseekV2ForCausalLM checkpoint (no q LoRA, softmax greedy routing)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_v2"), "v2")


@pytest.fixture
def netns_hosts():
    """``netns_hosts("a", "b", ...)`` makes hosts a, b, ... (:class:`tests.netns.NetnsHosts`: network
    namespaces on one bridge, the test skipped without root or iproute2); all are torn down afterwards."""
    from tests.netns import NetnsHosts  # only the multi-host tests need it (and EMS)

    made: list[NetnsHosts] = []

    def make(*names: str) -> NetnsHosts:
        made.append(NetnsHosts(names))
        return made[-1]

    yield make
    for hosts in made:
        hosts.close()
