"""Shared fixtures: tiny checkpoints written once per session by transformers itself, and
network-namespace hosts for the multi-host tests."""

from __future__ import annotations

import os

import pytest

from tests.checkpoints import make_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("MATRIXINFER_TEST_PRETEND_GPU") == "1":
    # Behave as on a machine with a visible GPU, in this process and in every child it starts
    # (tests/gpu_visible/sitecustomize.py): tests must state their device, never inherit a default.
    import torch

    torch.cuda.is_available = lambda: True
    _here = os.path.join(os.path.dirname(__file__), "gpu_visible")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_here, os.environ.get("PYTHONPATH", "")) if p)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` run only where a GPU really is (``device_count``, which the pretend-GPU
    mode does not fake); elsewhere they are skipped with the reason."""
    import torch

    if torch.cuda.device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none is visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory):
    """A tiny random DeepseekV3ForCausalLM checkpoint (q LoRA, 2 expert groups)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_v3"), "v3")


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A tiny V3 checkpoint with a byte-level tokenizer (vocab 264 covers its 261 tokens; 8 routed
    experts, 3 layers, the first dense), served by the serve, cluster and EP tests."""
    from matrixinfer.model.default_model import write_byte_tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("served"), "v3", seed=9, vocab_size=264,
                           bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(path)
    return path


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
