"""The embedded single-host PDC deployment: router + API in this process, an EMS controller
thread, and EMS servers, prefill and decode workers as child processes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from matrixinfer import envs
from matrixinfer.cli_args import to_argv
from matrixinfer.config import EngineConfig, ServeConfig

log = logging.getLogger(__name__)


class Children:
    """Child processes started by the launcher; all are terminated when it exits."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "matrixinfer.cli", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, **(env or {})), preexec_fn=_die_with_parent)
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 10
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies, however it dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_line(proc: subprocess.Popen, pattern: str, timeout: float, name: str) -> str:
    """Read the child's output until a line matches ``pattern``; return the first group."""
    deadline = time.time() + timeout
    rx = re.compile(pattern)
    assert proc.stdout is not None  # started with stdout=PIPE
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{name} exited before becoming ready (exit code {proc.poll()})")
        hit = rx.search(line)
        if hit:
            return hit.group(1)
    raise RuntimeError(f"{name} not ready within {timeout:.0f} s")


def _drain(proc: subprocess.Popen, name: str) -> None:
    """Forward a child's output to our log (so it never blocks on a full pipe)."""
    import threading

    def pump() -> None:
        assert proc.stdout is not None  # started with stdout=PIPE
        for line in proc.stdout:
            sys.stderr.write(f"[{name}] {line}")
        code = proc.wait()
        if code not in (0, -signal.SIGTERM, -signal.SIGINT):
            log.warning("%s exited with code %s", name, code)

    threading.Thread(target=pump, daemon=True).start()


def worker_args(engine: EngineConfig, cfg: ServeConfig, role: str, router: str) -> list[str]:
    """Command-line arguments of a worker that inherits this launcher's engine settings (its
    role's KV cache size where one is given)."""
    kv_mem = cfg.decode_kv_cache_memory if role == "decode" else cfg.prefill_kv_cache_memory
    if kv_mem:
        engine = dataclasses.replace(engine, kv_cache_memory=kv_mem)
    return ["worker", "--role", role, "--router", router, *to_argv(engine)]


def serve_pdc(engine_cfg: EngineConfig, cfg: ServeConfig) -> int:
    """Start the deployment and serve until interrupted."""
    import uvicorn

    from matrixinfer.ems.config import parse_size
    from matrixinfer.ems.controller import Controller
    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.serve.api_server import create_app
    from matrixinfer.serve.cli import print_banner
    from matrixinfer.serve.router import Router
    from matrixinfer.serve.worker import quiet_gc

    # SIGTERM before uvicorn takes over must still run the cleanup below
    signal.signal(signal.SIGTERM, _interrupt)
    model = Path(engine_cfg.model) if engine_cfg.model else default_model_path()
    engine_cfg = dataclasses.replace(engine_cfg, model=str(model))
    ems_capacity = parse_size(cfg.ems_capacity)
    children = Children()
    # The controller and EMS servers bind the router's --host: workers on other hosts must reach them.
    controller = Controller(cfg.host, 0).start() if cfg.num_ems > 0 else None
    router = Router(model, engine_cfg.served_model_name, reserve_timeout=cfg.reserve_timeout,
                    ems_controller=controller.address if controller else "")

    async def main() -> None:
        ctrl = await router.start(cfg.host, cfg.control_port)
        try:
            for i in range(cfg.num_ems):
                assert controller is not None
                p = children.start(f"ems{i}", ["ems-server", "--capacity", str(ems_capacity),
                                               "--listen", f"{cfg.host}:0", "--controller", controller.address])
                addr = await asyncio.to_thread(_wait_line, p, r"listening on (\S+)", 60, f"ems{i}")
                _drain(p, f"ems{i}")
                log.info("EMS server %d at %s", i, addr)
            # Share the cores: oversubscribed intra-op thread pools spin against each other.
            threads = cfg.worker_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.num_prefill + cfg.num_decode))
            env = {"MATRIXINFER_THREADS": str(envs.threads() or threads),
                   # huge pages for weight and KV allocations: first-touch of 4 KB pages dominates loading
                   "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}
            for role, n in (("prefill", cfg.num_prefill), ("decode", cfg.num_decode)):
                for i in range(n):
                    _drain(children.start(f"{role}{i}", worker_args(engine_cfg, cfg, role, ctrl), env), f"{role}{i}")
            await router.wait_for(cfg.num_prefill, cfg.num_decode, timeout=600)
            quiet_gc()
            app = create_app(router, api_key=cfg.api_key, max_request_bytes=cfg.max_request_bytes)
            print_banner(f"MatrixInfer PDC serving '{router.model_id}' ({cfg.num_prefill} prefill, {cfg.num_decode} "
                         f"decode, {cfg.num_ems} EMS server(s); workers join at {ctrl})", router.model_id, cfg)
            server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level))
            await server.serve()
        finally:
            children.stop()
            if controller:
                controller.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        children.stop()
    return 0
