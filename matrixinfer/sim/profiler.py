"""``matrixinfer profile``: time the runtime's real operators on the local device over a grid of shapes.

Every timing calls the module or kernel the engine calls (the model loaded as the engine loads it,
backends bound the same way), on a paged latent cache filled with random latents. A point's time
is the mean of repeated runs after a warm-up (the mean, not the minimum: the simulator
predicts what the engine sees on this machine, other load included; the header records the load
average). Operator names and axes are listed in :mod:`matrixinfer.sim.local_ops`.
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from matrixinfer.engine.cpu_affinity import bind_engine_thread, release, serving_threads
from matrixinfer.sim.profile_api import PD_IDLE, profile_api, profile_pd_request, profile_request, profile_serve_wait
from matrixinfer.sim.profile_data import Profile
from matrixinfer.sim.profile_idle import profile_idle
from matrixinfer.sim.profile_kv import profile_kv

if TYPE_CHECKING:
    from matrixinfer.engine.model_runner import ModelRunner
    from matrixinfer.model.attention import PagedLatentCache


@dataclass(frozen=True)
class Grid:
    """Shapes to measure. ``min_time`` is the least time spent repeating one point."""

    name: str
    tokens: tuple[int, ...]
    batch: tuple[int, ...]
    kv_len: tuple[int, ...]
    prefill: tuple[int, ...]
    tokens_per_expert: tuple[int, ...]
    host_batch: tuple[int, ...]
    ems_block_kib: tuple[int, ...]
    ems_concurrency: tuple[int, ...]
    ep: tuple[int, ...]
    ep_tokens: tuple[int, ...]
    min_time: float
    max_reps: int
    api_prompt: tuple[int, ...] = (16, 256)  # prompt lengths of the API's request latency
    api_load: tuple[int, ...] = (0, 1, 8, 32, 64)  # other requests streaming meanwhile (api_request, api_in)
    api_streams: tuple[int, ...] = (1, 8, 32, 64)  # concurrent streams of the API's per-token cost
    api_tokens: int = 64  # tokens per stream
    api_idle: tuple[float, ...] = (0.005, 0.03, 0.1, 0.3, 1.0)  # idle seconds before a request of api_wake
    api_idle_rounds: int = 6
    idle_tokens: tuple[int, ...] = (1, 64, 256, 512)  # step sizes of idle_wake (1: a decode step)
    idle_gaps: tuple[float, ...] = (0.005, 0.03, 0.1, 0.3, 1.0)  # idle seconds before the step (see profile_idle)
    idle_rounds: int = 6
    kv_tokens: tuple[int, ...] = (16, 64, 256, 1024)  # prompt lengths of the P/D KV transfer
    kv_rounds: int = 8
    pd_prompt: tuple[int, ...] = (16, 256)  # prompt lengths of pd_request (real P/D and colocated servers)
    pd_rounds: int = 2


TOKEN_SETS = 64  # token sets a profiled decode layer cycles through (see _token_cycle)
TOKEN_POOL = 4096  # tokens _token_cycle draws before it repeats


def _token_cycle(vocab: int, seed: int = 0) -> Iterator[int]:
    """Token ids for profiled decode steps: a fixed-seed uniform draw over the vocabulary, repeating
    after :data:`TOKEN_POOL`. Each repetition of a timed decode step or layer decodes new tokens,
    as serving does. Rerunning one token routed every repetition to the same experts, which then
    stayed in the cache, while a serving step routes each new token afresh and reads experts the
    steps before did not (a MoE model's decode step at small batch is mostly those reads). On the
    demo model, whose float32 experts nearly fit the 32 MiB L3 of the machine it was measured on,
    new tokens cost little: a model-runner decode step at 64 keys, both ways timed alternately
    (2 threads), took 1.00x at batch 1, 1.05x at 8, 1.04x at 32, 1.01x at 64."""
    rng = random.Random(seed)
    return itertools.cycle([rng.randrange(vocab) for _ in range(TOKEN_POOL)])


GRIDS = {
    "tiny": Grid("tiny", tokens=(1, 4), batch=(1, 2), kv_len=(16, 32), prefill=(8, 16),
                 tokens_per_expert=(1, 2), host_batch=(1, 2), ems_block_kib=(4, 16), ems_concurrency=(1, 2),
                 ep=(2,), ep_tokens=(1, 4),
                 min_time=0.002, max_reps=3, api_prompt=(8,), api_load=(0, 1), api_streams=(1, 2), api_tokens=4,
                 api_idle=(0.001,), api_idle_rounds=1,
                 idle_tokens=(1, 8), idle_gaps=(0.001, 0.003), idle_rounds=2, kv_tokens=(8, 16), kv_rounds=2,
                 pd_prompt=()),
    "full": Grid("full", tokens=(1, 4, 16, 64, 256, 1024), batch=(1, 4, 8, 16, 32, 64),
                 kv_len=(16, 64, 256, 1024), prefill=(16, 64, 128, 256, 512, 1024),
                 tokens_per_expert=(1, 4, 16, 64, 256), host_batch=(1, 8, 32, 64),
                 ems_block_kib=(16, 64, 256, 1024), ems_concurrency=(1, 2, 4), ep=(2, 4), ep_tokens=(1, 8, 64),
                 min_time=0.15, max_reps=200),
    # the base of `simulate validate` when no --profile is given: the validation's shapes, coarser,
    # no EMS or EP (each scenario then re-measures the part of it that its simulation reads)
    "small": Grid("small", tokens=(1, 16, 64, 256), batch=(1, 8, 32, 64), kv_len=(16, 64, 256),
                  prefill=(16, 64, 256), tokens_per_expert=(1, 4, 16, 64), host_batch=(1, 8, 32, 64),
                  ems_block_kib=(), ems_concurrency=(), ep=(), ep_tokens=(), min_time=0.1, max_reps=100,
                  api_streams=(1, 8, 64), api_load=(0, 1, 8, 64), idle_tokens=(1, 64, 256), idle_rounds=4,
                  kv_tokens=(16, 256), kv_rounds=4),
}


def time_call(fn: Callable[[], object], min_time: float, max_reps: int) -> float:
    """Mean seconds of ``fn`` over repeats filling ``min_time`` (at least 3, at most ``max_reps``)."""
    return time_calls([fn], min_time, max_reps)[0]


def time_calls(fns: list[Callable[[], object]], min_time: float, max_reps: int) -> list[float]:
    """Mean seconds of each of ``fns``, run in interleaved rounds after one warm-up each.

    The mean, not the median or minimum: the simulator predicts averages (throughput, mean TTFT
    and TPOT) on this machine as it is, other load included. Interleaving puts a step and its
    operators in the same stretch of that load, so their difference (the composition overhead)
    is not a difference between two moments."""
    for fn in fns:
        fn()  # warm-up: caches, lazy native builds, allocator
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < 3 or (spent < min_time * len(fns) and len(times[0]) < max_reps):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            out.append(dt)
            spent += dt
    return [statistics.fmean(t) for t in times]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def header(device: torch.device, grid: Grid, model_path: Path, threads: int) -> dict[str, object]:
    import numpy

    import matrixinfer
    return {"device": device.type, "device_name": device_name(device), "cores": os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "matrixinfer": getattr(matrixinfer, "__version__", "dev"),
            "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": str(model_path), "grid": grid.name, "load_avg_start": os.getloadavg()[0]}


class Profiler:
    """Loads the model once and measures each operator family into a :class:`Profile`."""

    def __init__(self, model_path: Path, device: torch.device, grid: Grid, threads: int,
                 with_ems: bool = True, with_engine: bool = True, with_ep: bool = True,
                 model=None) -> None:
        """``model``: an already loaded model of ``model_path`` (``simulate validate`` profiles
        before every scenario and loads the model once)."""
        from matrixinfer.model.loader import load_model

        self.path, self.device, self.grid, self.threads = model_path, device, grid, threads
        from matrixinfer.sim.profile_ep import available

        self.with_ems, self.with_engine = with_ems, with_engine
        self.with_ep = with_ep and available() and device.type == "cpu" and bool(grid.ep)
        torch.set_num_threads(threads)
        self.model = model if model is not None else load_model(
            model_path, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16, device=device, progress=False)
        self.cfg = self.model.config
        self.prof = Profile(header(device, grid, model_path, threads))
        self.block_size = 16
        self._cache: PagedLatentCache | None = None
        self._model_runner: ModelRunner | None = None

    # -- helpers ---------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time(self, fn: Callable[[], object]) -> float:
        return self._time_many([fn])[0]

    def _time_many(self, fns: list[Callable[[], object]]) -> list[float]:
        def synced(fn: Callable[[], object]) -> None:
            fn()
            self._sync()
        with torch.inference_mode():
            return time_calls([partial(synced, fn) for fn in fns], self.grid.min_time, self.grid.max_reps)

    def _paged(self, seqs: int, q_len: int, ctx: int):
        """A paged cache holding ``seqs`` sequences of ``ctx`` keys and the metadata of a step that
        adds the last ``q_len`` of them to each."""
        from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache

        per = -(-ctx // self.block_size)
        need = seqs * per + 1
        dtype = self.model.model.embed_tokens.weight.dtype
        if self._cache is None or self._cache.num_blocks < need:
            self._cache = PagedLatentCache(self.model.num_cache_layers, need, self.block_size,
                                           self.cfg.kv_cache_dim, dtype, self.device)
            self._cache.data.normal_(0, 0.5)
        tables = torch.arange(seqs * per, dtype=torch.int32).view(seqs, per)
        meta = AttentionMetadata.build([q_len] * seqs, [ctx] * seqs, tables, self.block_size, self.device)
        assert meta.tok_nkeys is not None, "a paged batch's metadata"
        pos = meta.tok_nkeys.long() - 1
        return self._cache, meta, pos

    def points(self) -> int:
        g = self.grid
        two = len(g.batch) * len(g.kv_len)
        n = len(g.tokens) + len(g.tokens_per_expert) + len(g.batch) + two + len(g.prefill) + 2
        if self.with_engine:
            n += len(g.host_batch) + len(g.idle_tokens) + len(g.kv_tokens) + len(g.pd_prompt)
            if g.api_prompt and g.api_streams:  # the API probe (with api_wake) and the served engine
                n += len(g.api_prompt) * max(len(g.api_load), 1) + 2 * len(g.api_streams) + \
                    bool(g.api_idle and g.api_idle_rounds) + 1 + (len(PD_IDLE) if g.pd_prompt else 0)
        if self.with_ems:
            n += 2 * len(g.ems_block_kib) * len(g.ems_concurrency)
        if self.with_ep:
            n += len(g.ep)
        return n

    # -- measurements ----------------------------------------------------------------------------
    def run(self, tick: Callable[[str], None]) -> Profile:
        t0 = time.perf_counter()
        for label in self._roofline():
            tick(label)
        for label in self._token_ops():
            tick(label)
        for label in self._attention_and_steps():
            tick(label)
        if self.with_engine:  # a family with no points in the grid is skipped (focused grids)
            g = self.grid
            if g.host_batch:
                for label in self._engine_host():
                    tick(label)
            if g.idle_tokens and g.idle_gaps:
                for label in profile_idle(self._idle_step, g.idle_tokens, g.idle_gaps, g.idle_rounds, self.prof.table):
                    tick(label)
            if g.kv_tokens:
                for label in profile_kv(self._decode_engine(), g.kv_tokens, g.kv_rounds, self.prof.table):
                    tick(label)
            if g.api_prompt and g.api_streams:
                for label in profile_api(self.path, g.api_streams, g.api_tokens, self.prof.table):
                    tick(label)
                serving = self._serving_engine()
                for label in profile_request(serving, g.api_prompt, g.api_load or (0,), g.api_idle, g.api_idle_rounds,
                                             self.prof.table):
                    tick(label)
                for label in profile_serve_wait(serving, g.api_streams, g.api_tokens, self.prof.table,
                                                pd=bool(g.pd_prompt)):  # a P/D decode worker where P/D is profiled
                    tick(label)
            if g.pd_prompt:
                for label in profile_pd_request(self.path, g.pd_prompt, g.pd_rounds, self.prof.table):
                    tick(label)
        if self.with_ems:
            for label in self._ems():
                tick(label)
        if self.with_ep:
            for label in self._ep():
                tick(label)
        self.prof.meta["wall_s"] = round(time.perf_counter() - t0, 1)
        self.prof.meta["load_avg_end"] = os.getloadavg()[0]
        return self.prof

    def _roofline(self) -> Iterator[str]:
        n = 1024 if self.grid.name != "tiny" else 256
        dtype = self.model.model.embed_tokens.weight.dtype
        a = torch.randn(n, n, dtype=dtype, device=self.device)
        b = torch.randn(n, n, dtype=dtype, device=self.device)
        self.prof.roofline["gemm_flops"] = 2.0 * n ** 3 / self._time(lambda: a @ b)
        yield "roofline gemm"
        src = torch.randn(8 << 20 if self.grid.name != "tiny" else 1 << 20, device=self.device)
        dst = torch.empty_like(src)
        self.prof.roofline["stream_bw"] = 2.0 * src.numel() * src.element_size() / self._time(lambda: dst.copy_(src))
        yield "roofline stream"

    def _parts(self):
        """The first MoE and dense blocks, their attention, MLP and MoE modules (typed)."""
        from matrixinfer.model.deepseek import Block
        from matrixinfer.model.layers import MLP
        from matrixinfer.model.moe import MoE

        blocks = [cast(Block, ly) for ly in self.model.model.layers]
        moe_block = next((b for b in blocks if isinstance(b.mlp, MoE)), None)
        dense_block = next((b for b in blocks if isinstance(b.mlp, MLP)), None)
        attn = (moe_block or blocks[0]).self_attn
        moe = cast(MoE, moe_block.mlp) if moe_block is not None else None
        dense = cast(MLP, dense_block.mlp) if dense_block is not None else None
        return blocks, moe_block, dense_block, attn, moe, dense

    def _token_ops(self) -> Iterator[str]:
        from matrixinfer.engine.sampler import Sampler
        from matrixinfer.engine.sampling_params import SamplingParams
        from matrixinfer.model.experts import Routing

        blocks, _, _, attn, moe, dense = self._parts()
        h = self.cfg.hidden_size
        dtype = self.model.model.embed_tokens.weight.dtype
        p = self.prof
        for t in self.grid.tokens:
            x = torch.randn(t, h, dtype=dtype, device=self.device)
            y = torch.randn(t, attn.n_heads * attn.v_dim, dtype=dtype, device=self.device)
            p.table("mla_prolog", ("tokens",)).add((t,), self._time(partial(attn._project, x)))
            p.table("mla_epilogue", ("tokens",)).add((t,), self._time(partial(attn.o_proj, y)))
            p.table("rmsnorm", ("tokens",)).add((t,), self._time(partial(blocks[0].input_layernorm, x)))
            if dense is not None:
                p.table("dense_mlp", ("tokens",)).add((t,), self._time(partial(dense, x)))
            if moe is not None:
                p.table("routing", ("tokens",)).add((t,), self._time(partial(moe.route, x)))
                if moe.shared_experts is not None:
                    p.table("shared_expert", ("tokens",)).add((t,), self._time(partial(moe.shared_experts, x)))
            yield f"token ops x{t}"
        sampler = Sampler()
        for t in self.grid.batch:
            x = torch.randn(t, h, dtype=dtype, device=self.device)
            p.table("lm_head", ("tokens",)).add((t,), self._time(partial(self.model.compute_logits, x)))
            logits = self.model.compute_logits(x)
            params = [SamplingParams(max_tokens=1, temperature=0.0)] * t  # greedy, as the bench and validation run
            p.table("sampling", ("tokens",)).add((t,), self._time(
                partial(sampler, logits, [str(i) for i in range(t)], params)))
            yield f"head x{t}"
        if moe is not None:
            e, k = moe.gate.n_experts, moe.gate.top_k
            for tpe in self.grid.tokens_per_expert:
                tokens = max(1, tpe * e // k)  # token i -> experts i*k .. i*k+k-1 (mod E): tpe tokens each
                x = torch.randn(tokens, h, dtype=dtype, device=self.device)
                expert_ids = (torch.arange(tokens * k, device=self.device) % e).view(tokens, k)
                routing = Routing(expert_ids, torch.full((tokens, k), 1.0 / k, device=self.device))
                p.table("experts", ("tokens_per_expert",)).add((tpe,), self._time(partial(moe.experts, x, routing)))
                yield f"experts {tpe}/expert"

    def _attention(self, attn, seqs: int, q_len: int, ctx: int) -> Callable[[], object]:
        """The attention the CPU backend runs for this batch (fused kernels where they apply),
        from the latent prolog to the W_UV epilogue, over a paged cache."""
        cache, meta, pos = self._paged(seqs, q_len, ctx)
        x = torch.randn(seqs * q_len, self.cfg.hidden_size, dtype=cache.dtype, device=self.device)
        cos, sin = self.model.rope.cos_sin(pos)
        q, kv = attn._project(x)
        slots = attn._fused_slots(meta, cache)
        if slots is not None:
            return partial(attn._fused, q, kv, cos, sin, self.model.rope, meta, slots)
        return partial(attn._attend, q, kv, cos, sin, self.model.rope, meta, cache)

    def _layer(self, block, ids: Iterator[torch.Tensor], pos: torch.Tensor, meta, cache) -> None:
        """One decoder layer as the model runs it in a decode step (one native call on the CPU),
        over the next token ids of ``ids``."""
        x, cos, sin = self.model._embed(next(ids), pos, meta)
        step = self.model._native_step(x, cos, sin, meta, cache) if self.device.type == "cpu" else None
        block(x, cos, sin, self.model.rope, meta, cache, step)

    def _runner(self):
        """A model runner (the engine's) with a cache for the largest profiled step."""
        from matrixinfer.config import EngineConfig
        from matrixinfer.engine.model_runner import ModelRunner

        if self._model_runner is None:
            g = self.grid
            blocks = max(max(g.batch) * -(-max(g.kv_len) // self.block_size), -(-max(g.prefill) // self.block_size))
            self._model_runner = ModelRunner(self.model, EngineConfig(block_size=self.block_size,
                                                                      kv_cache_memory=self._kv_bytes(blocks + 1)),
                                             self.device)
        return self._model_runner

    def _kv_bytes(self, blocks: int) -> int:
        """Bytes of ``blocks`` blocks of the profiled model's paged latent cache."""
        from matrixinfer.model.attention import PagedLatentCache

        return blocks * PagedLatentCache.bytes_per_block(self.model.num_cache_layers, self.block_size,
                                                         self.cfg.kv_cache_dim,
                                                         self.model.model.embed_tokens.weight.dtype)

    def _runner_step(self, seqs: int, q_len: int, ctx: int) -> Callable[[], object]:
        """``ModelRunner.execute`` (metadata, forward, logits of the sampled rows) over ``seqs``
        sequences that each add their last ``q_len`` of ``ctx`` tokens."""
        from matrixinfer.engine.sampling_params import SamplingParams
        from matrixinfer.engine.sequence import Sequence

        runner = self._runner()
        per = -(-ctx // self.block_size)
        batch = []
        for i in range(seqs):
            seq = Sequence(f"p{i}", [10 + (i + j) % 100 for j in range(ctx)], SamplingParams())
            seq.block_table = list(range(i * per, (i + 1) * per))
            seq.num_computed = ctx - q_len
            batch.append((seq, q_len))
        if q_len != 1:
            return partial(runner.execute, batch)
        tokens = _token_cycle(self.cfg.vocab_size)

        def decode_step() -> object:  # each call decodes new tokens, as serving does (see _token_cycle)
            for seq, _ in batch:
                seq.prompt_ids[-1] = next(tokens)
            return runner.execute(batch)
        return decode_step

    def _decode_engine(self):
        """An engine of the profiled model that can hold the longest profiled KV transfer."""
        from matrixinfer.config import EngineConfig
        from matrixinfer.engine.llm_engine import LLMEngine

        return LLMEngine(EngineConfig(model=str(self.path), device=self.device.type, kv_cache_memory=64 << 20,
                                      enable_prefix_caching=False),
                         model=self.model)

    def _serving_engine(self):
        """The served engine of ``api_request`` and ``serve_wait``: the profiled model with KV
        blocks for its widest run, for its prompt steps' prompt and for the request probes beside
        their widest background."""
        from matrixinfer.config import EngineConfig
        from matrixinfer.engine.llm_engine import LLMEngine
        from matrixinfer.sim.profile_api import BACKGROUND_PROMPT, PREFILL_PROMPT, background_tokens

        g = self.grid

        def blocks_of(tokens: int) -> int:
            return -(-tokens // self.block_size)
        top = max(g.api_streams)
        probe = blocks_of(max(g.api_prompt, default=16) + 2)
        max_len = int(self.cfg.max_position_embeddings)
        background = max((n * blocks_of(BACKGROUND_PROMPT + background_tokens(n, max_len) + 1) for n in g.api_load),
                         default=0)
        blocks = max(top * blocks_of(16 + g.api_tokens + 1), blocks_of(PREFILL_PROMPT + 2), background + probe) + 1
        cfg = EngineConfig(model=str(self.path), device=self.device.type, kv_cache_memory=self._kv_bytes(2 * blocks),
                           block_size=self.block_size, max_num_seqs=max(top, max(g.api_load, default=0) + 1, 1))
        return LLMEngine(cfg, model=self.model)

    def _idle_step(self, tokens: int) -> Callable[[], object]:
        """``idle_wake``'s step: one sequence decoding (``tokens`` 1, 64 keys) or one prompt chunk."""
        return self._runner_step(1, 1, 64) if tokens == 1 else self._runner_step(1, tokens, tokens)

    def _attention_and_steps(self) -> Iterator[str]:
        """Attention cores and one-call layers, interleaved per shape; then the model runner's
        steps, each timed back to back on its own, as the engine runs its steps. Interleaved with
        the operators, each step started on caches the other operators had filled: on the demo
        model (2-core Intel Xeon VM, one thread, 2026-12-01), a decode step at 64 keys measured
        1.15x (batch 1), 1.13x (8) and 1.08x (64) its back-to-back time, and the served engine's
        steps matched the back-to-back time."""
        _, moe_block, dense_block, attn, _, _ = self._parts()
        p = self.prof
        for b in self.grid.batch:
            for kv in self.grid.kv_len:
                cache, meta, pos = self._paged(b, 1, kv)
                cycle = _token_cycle(self.cfg.vocab_size)
                ids = itertools.cycle([torch.tensor([next(cycle) for _ in range(b)], device=self.device)
                                       for _ in range(TOKEN_SETS)])
                names = [("mla_core_q1", (b, kv)), ("mla_core_qk", (2 * b, kv))]
                fns = [self._attention(attn, b, 1, kv), self._attention(attn, b, 2, kv)]
                for name, block in (("layer_decode", moe_block), ("layer_decode_dense", dense_block)):
                    if block is not None:
                        names.append((name, (b, kv)))
                        fns.append(partial(self._layer, block, ids, pos, meta, cache))
                for (name, point), seconds in zip(names, self._time_many(fns)):
                    p.table(name, ("tokens", "kv_len")).add(point, seconds)
                p.table("step_decode", ("tokens", "kv_len")).add((b, kv), self._time(self._runner_step(b, 1, kv)))
                yield f"attention + step b{b} kv{kv}"
        for t in self.grid.prefill:
            p.table("mla_core_prefill", ("tokens",)).add((t,), self._time(self._attention(attn, 1, t, t)))
            p.table("step_prefill", ("tokens",)).add((t,), self._time(self._runner_step(1, t, t)))
            yield f"prefill step {t}"

    def _engine_host(self) -> Iterator[str]:
        """Per-step host work of the real engine decoding ``b`` sequences: its step time minus the
        model runner's and the sampler's (both timed inside the same steps)."""
        from matrixinfer.config import EngineConfig
        from matrixinfer.engine.llm_engine import LLMEngine
        from matrixinfer.engine.sampling_params import SamplingParams

        top = max(self.grid.host_batch)
        ctx = 32
        steps = 12 if self.grid.name != "tiny" else 3
        cfg = EngineConfig(model=str(self.path), device=self.device.type, kv_cache_memory=64 << 20,
                           max_num_seqs=top, max_num_batched_tokens=max(1024, top * ctx),
                           enable_prefix_caching=False)
        engine = LLMEngine(cfg, model=self.model)
        timer = {"run": 0.0}
        execute, sampler = engine.runner.execute, engine.sampler

        def timed_execute(chunks):
            t0 = time.perf_counter()
            out = execute(chunks)
            timer["run"] += time.perf_counter() - t0
            return out

        class TimedSampler:  # the sampler is profiled alone as ``sampling``
            def __call__(self, *args):
                t0 = time.perf_counter()
                out = sampler(*args)
                timer["run"] += time.perf_counter() - t0
                return out

            def __getattr__(self, name):
                return getattr(sampler, name)

        engine.runner.execute = timed_execute  # type: ignore[method-assign]
        engine.sampler = TimedSampler()  # type: ignore[assignment]
        n = 0
        for b in self.grid.host_batch:
            for _ in range(b):
                n += 1
                engine.add_request(f"h{n}", [10 + (n + i) % 200 for i in range(ctx)],
                                   SamplingParams(max_tokens=steps + 2, ignore_eos=True))
            while engine.waiting or any(s.num_computed < s.num_tokens - 1 for s in engine.running):
                engine.step()
            samples = []
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                timer["run"] = 0.0
                t0 = time.perf_counter()
                engine.step()
                samples.append(time.perf_counter() - t0 - timer["run"])
            cores_busy = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
            self.prof.table("engine_host", ("tokens",)).add((b,), max(statistics.fmean(samples), 0.0))
            self.prof.table("engine_cores", ("tokens",)).add((b,), cores_busy)
            for rid in list(engine.seqs):
                engine.abort(rid)
            yield f"engine host b{b}"

    def _ep(self) -> Iterator[str]:
        """Dispatch/combine of the expert-parallel backend at EP 2/4 (separate rank processes)."""
        from matrixinfer.sim.profile_ep import profile_dispatch_combine

        c = self.cfg
        if not c.n_routed_experts or not c.num_experts_per_tok:
            return
        reps = 3 if self.grid.name == "tiny" else 30
        for ep in self.grid.ep:
            got = profile_dispatch_combine(ep, c.hidden_size, c.n_routed_experts, c.num_experts_per_tok,
                                           list(self.grid.ep_tokens), reps)
            for t, (disp, comb) in got.items():
                self.prof.table("ep_dispatch", ("ep", "tokens")).add((ep, t), disp)
                self.prof.table("ep_combine", ("ep", "tokens")).add((ep, t), comb)
            yield f"dispatch/combine EP{ep}"

    def _ems(self) -> Iterator[str]:
        """EMS put/get through the client against an in-process server on loopback."""
        from concurrent.futures import ThreadPoolExecutor

        from matrixinfer.ems.client import EmsClient
        from matrixinfer.ems.server import EmsServer
        from matrixinfer.ems.service import EmsService

        service = EmsService(64 << 20)
        server = EmsServer(service)
        thread = threading.Thread(target=server.serve_forever, daemon=True, name="profile-ems")
        thread.start()
        try:
            with EmsClient([server.address], namespace="profile") as client:
                for kib in self.grid.ems_block_kib:
                    blob = os.urandom(kib << 10)
                    count = max(4, min(64, (8 << 20) // (kib << 10)))
                    for conc in self.grid.ems_concurrency:
                        keys = [f"b{kib}-{conc}-{i}".encode() for i in range(count)]
                        groups = [keys[i::conc] for i in range(conc)]
                        with ThreadPoolExecutor(conc) as pool:
                            put_s = time_call(partial(_ems_round, pool, client, groups, blob),
                                              self.grid.min_time, self.grid.max_reps)
                            self.prof.table("ems_put", ("block_kib", "concurrency")).add((kib, conc), put_s / count)
                            yield f"ems put {kib} KiB x{conc}"
                            get_s = time_call(partial(_ems_round, pool, client, groups, None),
                                              self.grid.min_time, self.grid.max_reps)
                            self.prof.table("ems_get", ("block_kib", "concurrency")).add((kib, conc), get_s / count)
                            yield f"ems get {kib} KiB x{conc}"
                        client.mdelete(keys)
        finally:
            server.stop()


def _ems_round(pool, client, groups: list[list[bytes]], blob: bytes | None) -> None:
    """One put (``blob``) or get (None) of every key, one group of keys per concurrent caller."""
    if blob is None:
        list(pool.map(client.mget, groups))
    else:
        list(pool.map(lambda ks: client.mput([(k, blob) for k in ks]), groups))


def deployment_threads(deployment: str, cores: int) -> int:
    """Threads of one engine's team: the colocated server's (all cores but one, left to the API
    server: ``serving_threads``), half the cores each for the two P/D workers."""
    return serving_threads(cores) if deployment == "colocated" else max(1, cores // 2)


def threads_tables(text: str | None, cores: int) -> list[int]:
    """Thread counts to profile: ``--threads 2,1``, or by default the colocated server's engine
    threads (all cores but one: ``serving_threads``) and, when different, the share each of the two
    P/D workers gets (``serve``'s default split)."""
    if text is None:
        return sorted({deployment_threads("colocated", cores), deployment_threads("pd", cores)}, reverse=True)
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--threads {text!r}: expected comma-separated integers") from None
    if not out or min(out) < 1:
        raise ValueError(f"--threads {text!r}: each thread count must be at least 1")
    return out


def _on_worker_thread(fn: Callable[[Callable[[str], None]], Profile], tick: Callable[[str], None]) -> Profile:
    """Run ``fn`` on a thread of its own, as the engine runs its steps (AsyncEngine's and the
    workers' engine threads): with other load on the cores, multi-threaded operators launched from
    the main thread were measured 10-100x slower here than the same calls on a worker thread, so
    only the engine's own context gives the engine's times."""
    result: list[Profile] = []
    errors: list[BaseException] = []

    def target() -> None:
        pinned = None
        try:  # the team pinned as a served engine's is (--cpu-bind auto: engine/cpu_affinity.py)
            pinned = bind_engine_thread("auto", torch.get_num_threads())
            result.append(fn(tick))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(exc)
        finally:
            release(pinned)
    thread = threading.Thread(target=target, name="profile")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def measure(model_path: Path, grid: Grid, device: torch.device, threads: int, model=None) -> Profile:
    """Measure ``grid`` without EMS or EP and write nothing: the per-scenario profiles of
    ``simulate validate --profile-each`` (``model``: the model already loaded, or None)."""
    profiler = Profiler(model_path, device, grid, threads, with_ems=False, with_ep=False, model=model)
    return _on_worker_thread(profiler.run, lambda label: None)


def run_profile(model_path: Path, out: Path, grid: Grid, device: torch.device, threads: int,
                progress: bool = True, with_ems: bool = True, with_engine: bool = True,
                with_ep: bool = True) -> Profile:
    """Measure ``grid`` and write ``out`` (JSON) and its CSV; returns the profile."""
    from tqdm import tqdm

    profiler = Profiler(model_path, device, grid, threads, with_ems, with_engine, with_ep)
    with tqdm(total=profiler.points(), disable=not progress, unit="op", desc="profile") as bar:
        def tick(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)
        prof = _on_worker_thread(profiler.run, tick)
    prof.save(out)
    return prof
