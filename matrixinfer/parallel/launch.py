"""Starting the ranks of an EP instance: torchrun's environment for each rank process, the
model loaded and sharded on each, rank 0's :class:`DPEngine` in the serving process.

On one host (``--ep N``) the serving process is rank 0 and starts ranks 1..N-1 as children. On
several (``--nnodes M --node-rank i --master-addr A --master-port P``), node i starts ranks
``i*N/M .. (i+1)*N/M - 1``; node 0's serving process is rank 0. Ranks can also be started by
``torchrun`` (``python -m matrixinfer.parallel.rank`` reads ``RANK`` etc.) for ranks >= 1.

In a P/D deployment with the EMS pool, ranks >= 1 build their own EMS connector from a
:class:`~matrixinfer.parallel.messages.RankConnector` and the deployment secret, both passed in
their environment by :func:`spawn_ranks` (never on the command line).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import torch

from matrixinfer.auth import ENV_SECRET, ENV_SECRET_FILE, write_secret_file
from matrixinfer.cli_args import to_argv
from matrixinfer.config import EngineConfig
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.moe import MoE
from matrixinfer.parallel.dp_engine import DPEngine
from matrixinfer.parallel.ep_moe import enable_expert_parallel, enable_microbatches
from matrixinfer.parallel.eplb import ReplicatedPlacement, plan_placement
from matrixinfer.parallel.group import STORE_ENV, EPGroup, RankEnv
from matrixinfer.parallel.messages import CONNECTOR_ENV, RankConnector
from matrixinfer.parallel.placement import ExpertPlacement

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_ranks(cfg: EngineConfig) -> range:
    """The global ranks node ``cfg.node_rank`` runs."""
    per = cfg.ep // cfg.nnodes
    return range(cfg.node_rank * per, (cfg.node_rank + 1) * per)


def initial_placement(n_experts: int, n_ranks: int, n_redundant: int, live: bool = False) -> ReplicatedPlacement:
    """Where the experts start: contiguous blocks, or with ``n_redundant`` extra slots the
    balanced plan for an even load (the same on every rank: a pure function of its arguments).
    ``live``: the instance will rebalance, which needs equal slot counts on every rank."""
    if live and (n_experts + n_redundant) % n_ranks:
        raise ValueError(f"--eplb-interval: live rebalance needs the {n_experts} routed experts + --redundant-experts "
                         f"{n_redundant} to divide over --ep {n_ranks} ranks (every rank holds the same slots)")
    contiguous = ReplicatedPlacement.from_placement(ExpertPlacement.contiguous(n_experts, n_ranks))
    if not n_redundant:
        return contiguous
    return plan_placement([1.0] * n_experts, n_ranks, n_redundant)


def build_rank(cfg: EngineConfig, env: RankEnv, model: DeepseekForCausalLM | None = None,
               connector: KVConnector | None = None,
               ranks_have_connector: bool = False) -> tuple[LLMEngine, EPGroup]:
    """This rank's model (only its expert slots kept) and engine: a :class:`DPEngine` on rank 0."""
    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.model.device import resolve_device, resolve_dtype
    from matrixinfer.model.loader import load_model

    path = Path(cfg.model) if cfg.model else default_model_path()
    cfg = dataclasses.replace(cfg, model=str(path))
    dev = resolve_device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", env.rank % max(1, torch.cuda.device_count()))
    if model is None:
        model = load_model(path, dtype=resolve_dtype(cfg.dtype, dev), device=dev)
    n = model.config.n_routed_experts
    if not n:
        raise ValueError(f"{path}: a dense model has no routed experts to spread over --ep {cfg.ep} ranks")
    # before joining the group: a bad --redundant-experts fails fast, on every rank
    start = initial_placement(n, env.world_size, cfg.redundant_experts, live=cfg.eplb_interval > 0)
    group = EPGroup(env, ExpertPlacement.contiguous(n, env.world_size), cfg.dispatch_dtype, dev, cfg.ep_timeout)
    try:
        moe_layers = sum(isinstance(getattr(b, "mlp", None), MoE) for b in model.model.layers)
        enable_expert_parallel(model, group, [start] * moe_layers)
        enable_microbatches(model, group, cfg.microbatches)
        engine = (DPEngine(cfg, group, model, connector=connector, ranks_have_connector=ranks_have_connector)
                  if env.rank == 0 else LLMEngine(cfg, model=model, connector=connector))
    except BaseException:
        group.close()
        raise
    return engine, group


def spawn_ranks(cfg: EngineConfig, ranks: range, master_addr: str, master_port: int,
                store_path: str | None = None, rank_connector: RankConnector | None = None,
                secret: bytes | None = None) -> list[subprocess.Popen]:
    """Start ``python -m matrixinfer.parallel.rank`` for each of ``ranks`` with torchrun's variables
    (and the file store of a one-host instance; the EMS connector's description and the deployment
    secret when the ranks have their own EMS connector)."""
    local = max(1, len(node_ranks(cfg)))
    threads = os.environ.get("MATRIXINFER_THREADS") or str(max(1, (os.cpu_count() or 1) // local))
    argv = to_argv(dataclasses.replace(cfg, master_port=master_port, master_addr=master_addr))
    procs = []
    for r in ranks:
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r - ranks.start), WORLD_SIZE=str(cfg.ep),
                   MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), MATRIXINFER_THREADS=threads)
        if store_path is not None:
            env[STORE_ENV] = store_path
        if rank_connector is not None:
            env[CONNECTOR_ENV] = msgspec.json.encode(rank_connector).decode()
            env.update(_secret_env(secret))
        procs.append(subprocess.Popen([sys.executable, "-m", "matrixinfer.parallel.rank", *argv], env=env,
                                      preexec_fn=_die_with_parent))
    return procs


def _secret_env(secret: bytes | None) -> dict[str, str]:
    """The deployment secret for a child's environment: as text where it is (a generated secret is
    hex), else in a new private file."""
    if secret is None:
        return {}
    try:
        return {ENV_SECRET: secret.decode("ascii")}
    except UnicodeDecodeError:
        return {ENV_SECRET_FILE: str(write_secret_file(secret))}


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_ranks(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class EPInstance:
    """Rank 0's engine and the rank processes this host started for it."""

    def __init__(self, engine: DPEngine, procs: list[subprocess.Popen], store_dir: str | None = None) -> None:
        self.engine, self.procs, self.store_dir = engine, procs, store_dir

    def close(self) -> None:
        self.engine.close()
        stop_ranks(self.procs)
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)


def start_instance(cfg: EngineConfig, model: DeepseekForCausalLM | None = None,
                   connector: KVConnector | None = None, rank_connector: RankConnector | None = None,
                   secret: bytes | None = None) -> EPInstance:
    """Node 0: start this host's other ranks and become rank 0 (blocks until every rank joined);
    ``model``: rank 0's model when already loaded, ``connector``: its KV connector,
    ``rank_connector``: the EMS connector every other rank builds for itself (with ``secret``)."""
    if cfg.node_rank != 0:
        raise ValueError("only node 0 serves; other nodes run run_node()")
    port = cfg.master_port or free_port(cfg.master_addr)
    # one host: meet through a file in a private directory (a TCP store would listen on every interface)
    store_dir = tempfile.mkdtemp(prefix="matrixinfer-ep-") if cfg.nnodes == 1 else None
    store = os.path.join(store_dir, "store") if store_dir is not None else None
    if cfg.nnodes == 1 and "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in (n for _, n in socket.if_nameindex()):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would listen where the host name resolves (maybe a LAN)
    procs = spawn_ranks(cfg, node_ranks(cfg)[1:], cfg.master_addr, port, store, rank_connector, secret)
    torch_threads = os.environ.get("MATRIXINFER_THREADS")
    if torch_threads is None:
        os.environ["MATRIXINFER_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(node_ranks(cfg))))
    try:
        engine, _ = build_rank(cfg, RankEnv(0, cfg.ep, cfg.master_addr, port, store), model, connector,
                               ranks_have_connector=rank_connector is not None and cfg.nnodes == 1)
    except BaseException:
        stop_ranks(procs)
        if store_dir is not None:
            shutil.rmtree(store_dir, ignore_errors=True)
        raise
    finally:
        if torch_threads is None:
            os.environ.pop("MATRIXINFER_THREADS", None)
    assert isinstance(engine, DPEngine)
    log.info("EP instance: %d ranks over %d node(s), rendezvous %s:%d, dispatch %s", cfg.ep, cfg.nnodes,
             cfg.master_addr, port, cfg.dispatch_dtype)
    return EPInstance(engine, procs, store_dir)


def run_node(cfg: EngineConfig) -> int:
    """A node other than 0: run its ranks until they end; the first that fails stops the rest."""
    assert cfg.master_port is not None
    procs = spawn_ranks(cfg, node_ranks(cfg), cfg.master_addr, cfg.master_port)
    print(f"EP node {cfg.node_rank}/{cfg.nnodes}: ranks {list(node_ranks(cfg))} joining "
          f"{cfg.master_addr}:{cfg.master_port}", flush=True)
    try:
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop_ranks(procs)
    return max((p.returncode or 0) for p in procs)


def make_engine(cfg: EngineConfig, model: DeepseekForCausalLM | None = None,
                connector: KVConnector | None = None, rank_connector: RankConnector | None = None,
                secret: bytes | None = None) -> tuple[LLMEngine, EPInstance | None]:
    """The engine an instance serves with: one process (``--ep 1``) or rank 0 of an EP instance
    (whose other ranks build their own EMS connector from ``rank_connector``)."""
    if cfg.ep == 1:
        return LLMEngine(cfg, model=model, connector=connector), None
    inst = start_instance(cfg, model, connector, rank_connector, secret)
    return inst.engine, inst
