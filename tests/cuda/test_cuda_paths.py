"""The device-relevant paths on CUDA (``pytest -m cuda``; skipped with a reason where no GPU is visible).

- engine greedy parity against transformers' full forward, teacher-forced, in matched precision
  (both float32 on the GPU), so a near-tie cannot send the two down different continuations;
- the P/D deployment on CUDA gives the colocated CUDA engine's greedy tokens;
- KV blocks of a CUDA cache round-trip through the EMS context cache, and the model cache warm
  start builds a CUDA model equal to the cold one.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from tests.checkpoints import load_reference
from tests.serve.helpers import HEADERS, Server, stream_tokens

pytestmark = pytest.mark.cuda  # skipped where no GPU is visible (tests/conftest.py)

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42] * 7, list(range(3, 60))]


def _engine(checkpoint, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(checkpoint), device="cuda", dtype="float32", kv_cache_memory=64 << 20,
                                  block_size=8, **kw))


def test_engine_greedy_tokens_are_transformers_argmax_teacher_forced(tiny_v3):
    engine = _engine(tiny_v3)
    ref = load_reference(tiny_v3).to("cuda").float()
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        seq = torch.tensor([prompt + out], device="cuda")
        with torch.no_grad():
            logits = ref(seq).logits[0, len(prompt) - 1:-1].float()  # the logits that chose each output token
        top2 = logits.topk(2, dim=-1)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 1e-3  # skip exact near-ties
        chosen = torch.tensor(out, device="cuda")
        assert bool((top2.indices[:, 0] == chosen)[clear].all()), "engine token is not transformers' argmax"
        assert int(clear.sum()) >= len(out) // 2


def test_pd_on_cuda_matches_the_colocated_cuda_engine(served_checkpoint):
    expect = _engine(served_checkpoint).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12,
                                                                         ignore_eos=True))
    server = Server(served_checkpoint, "--num-prefill", "1", "--num-decode", "1", "--num-ems", "1",
                    "--dtype", "float32", "--kv-cache-memory", str(64 << 20), "--block-size", "8",
                    api_key=HEADERS["Authorization"].split()[-1], device="cuda")
    async def run(prompt: list[int]) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            ids, reason = await stream_tokens(client, server.url, {"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                                   "temperature": 0, "ignore_eos": True})
        assert reason == "length", reason
        return ids

    try:
        for prompt, want in zip(PROMPTS, expect):
            assert asyncio.run(run(prompt)) == want
    finally:
        server.stop()


def test_ems_context_cache_round_trips_cuda_kv_blocks(tiny_v3):
    from matrixinfer.ems.client import EmsClient
    from matrixinfer.engine.kv_connector import MultiConnector
    from matrixinfer.serve.pool import EmsConnector
    from tests.helpers import spawn

    proc, addr = spawn(["--capacity", "64M"])
    try:
        with EmsClient([addr], namespace="matrixinfer") as client:
            writer = _engine(tiny_v3, connector=EmsConnector(client, 8, "tiny"), enable_prefix_caching=False)
            reader = _engine(tiny_v3, connector=MultiConnector([EmsConnector(client, 8, "tiny")]),
                             enable_prefix_caching=False)
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            prompt = list(range(3, 60))
            expect = writer.generate([prompt], params)[0]
            deadline = time.monotonic() + 5  # blocks are stored asynchronously
            while writer.stats().ems_stored_blocks < len(prompt) // 8 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert reader.generate([prompt], params)[0] == expect
            assert reader.external_hit_tokens == len(prompt) // 8 * 8
    finally:
        proc.kill()
        proc.wait()


def test_model_cache_warm_start_builds_the_same_cuda_model(served_checkpoint):
    from matrixinfer.ems.client import EmsClient
    from matrixinfer.model.loader import load_model
    from matrixinfer.serve.pool import load_model_via_pool, publish_tensors
    from tests.helpers import spawn

    proc, addr = spawn(["--capacity", "256M"])
    try:
        with EmsClient([addr], namespace="matrixinfer") as client:
            cold = load_model(served_checkpoint, dtype=torch.bfloat16, device="cuda", progress=False)
            _, version = load_model_via_pool(client, served_checkpoint, "tiny", torch.bfloat16, "cuda")
            assert publish_tensors(client, served_checkpoint, "tiny", version) > 0
            warm, _ = load_model_via_pool(client, served_checkpoint, "tiny", torch.bfloat16, "cuda")
            assert warm is not None
            for (name, a), (_, b) in zip(cold.state_dict().items(), warm.state_dict().items()):
                assert a.device.type == "cuda" and torch.equal(a, b), name
    finally:
        proc.kill()
        proc.wait()
