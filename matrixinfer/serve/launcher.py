"""The embedded single-host PDC deployment: router + API in this process, an EMS controller
thread, and EMS servers, prefill and decode workers as child processes.

The launcher supervises its children: one that dies is started again after an exponential backoff
(:func:`restart_delay`), logged, and counted in ``/metrics`` (``matrixinfer_child_restarts_total``,
``matrixinfer_child_up``); a restarted worker joins the router as a new instance, a restarted EMS
server joins the ring through the controller. Every internal port requires the deployment secret
(:mod:`matrixinfer.auth`), which children receive in their environment, never on their command line.
"""

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from matrixinfer import auth, envs
from matrixinfer.cli_args import to_argv
from matrixinfer.config import EngineConfig, ServeConfig
from matrixinfer.progress import ENV as PROGRESS_ENV
from matrixinfer.progress import ChildBars

log = logging.getLogger(__name__)


RESTART_MIN_S = 1.0  # delay before restarting a child that died
RESTART_MAX_S = 30.0  # the delay doubles per quick death up to this
STABLE_AFTER_S = 60.0  # a child that ran this long before dying is restarted after RESTART_MIN_S again
SUPERVISE_INTERVAL_S = 0.25
_BARS = ChildBars()  # the children's progress bars (weight loading)
STOPPED_ON_PURPOSE = (0, -signal.SIGTERM, -signal.SIGINT)  # exit statuses of a child someone stopped: not restarted


def restart_delay(last_delay: float | None, ran_for: float) -> float:
    """Seconds to wait before restarting a child that ran ``ran_for`` seconds and was last restarted
    after ``last_delay`` (None: never): exponential backoff that starts over once a child ran stably."""
    if last_delay is None or ran_for >= STABLE_AFTER_S:
        return RESTART_MIN_S
    return min(RESTART_MAX_S, last_delay * 2)


@dataclass
class Child:
    """One supervised child process and its restart history."""

    name: str
    role: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    delay: float | None = None  # the last restart delay
    restart_at: float | None = None  # when a dead child is started again

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Children:
    """Child processes started by the launcher: supervised (a child that dies is restarted with
    exponential backoff, logged and counted; one stopped on purpose, by SIGTERM, SIGINT or a clean
    exit, is not) and all terminated when the launcher exits."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.stopping = False

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen]]:
        return [(c.name, c.proc) for c in self.children]

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, role: str = "") -> subprocess.Popen:
        child = Child(name, role or name.rstrip("0123456789"), args, dict(env or {}), self._spawn(args, env))
        self.children.append(child)
        return child.proc

    @staticmethod
    def _spawn(args: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "matrixinfer.cli", *args]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, **(env or {})), preexec_fn=_die_with_parent)

    def check(self, now: float) -> None:
        """Notice dead children and restart those whose delay has passed (called every
        ``SUPERVISE_INTERVAL_S`` from the launcher's event loop thread: a child's parent-death signal
        follows the thread that started it)."""
        for child in self.children:
            if self.stopping or child.alive:
                continue
            if child.restart_at is None and child.proc.returncode in STOPPED_ON_PURPOSE:
                log.info("%s stopped (exit status %s); not restarting it", child.name, child.proc.returncode)
                child.restart_at = float("inf")
            elif child.restart_at is None:
                child.delay = restart_delay(child.delay, now - child.started)
                child.restart_at = now + child.delay
                log.warning("%s exited with code %s after %.1f s; restarting it in %.1f s (restart %d)", child.name,
                            child.proc.returncode, now - child.started, child.delay, child.restarts + 1)
            elif now >= child.restart_at:
                try:
                    child.proc = self._spawn(child.args, child.env)
                except OSError as exc:
                    log.error("cannot restart %s: %s; trying again later", child.name, exc)
                    child.restart_at = now + RESTART_MAX_S
                    continue
                child.restarts += 1
                child.started, child.restart_at = now, None
                _drain(child.proc, child.name)
                log.warning("%s restarted (pid %d, restart %d)", child.name, child.proc.pid, child.restarts)

    async def supervise(self) -> None:
        """Run :meth:`check` until the launcher stops."""
        while not self.stopping:
            self.check(time.monotonic())
            await asyncio.sleep(SUPERVISE_INTERVAL_S)

    def stop(self) -> None:
        self.stopping = True
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.time() + 10
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                c.proc.kill()


class SupervisionCollector:
    """Prometheus series of the launcher's children: restarts by child and role, and whether each runs."""

    def __init__(self, children: Children) -> None:
        self.children = children

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily("matrixinfer_child_restarts", "Times the launcher restarted a dead child "
                                       "process (worker or EMS server)", labels=["child", "role"])
        up = GaugeMetricFamily("matrixinfer_child_up", "1 while the launcher's child process runs",
                               labels=["child", "role"])
        for c in self.children.children:
            restarts.add_metric([c.name, c.role], c.restarts)
            up.add_metric([c.name, c.role], 1.0 if c.alive else 0.0)
        yield restarts
        yield up


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
    """Forward a child's output to our log (so it never blocks on a full pipe); its progress lines
    become one bar per child (:class:`~matrixinfer.progress.ChildBars`)."""
    import threading

    from tqdm import tqdm

    def pump() -> None:
        assert proc.stdout is not None  # started with stdout=PIPE
        for line in proc.stdout:
            if not _BARS.feed(name, line):
                tqdm.write(f"[{name}] {line}", file=sys.stderr, end="")

    threading.Thread(target=pump, daemon=True).start()


def worker_args(engine: EngineConfig, cfg: ServeConfig, role: str, router: str) -> list[str]:
    """Command-line arguments of a worker that inherits this launcher's engine settings (its
    role's KV cache size where one is given)."""
    kv_mem = cfg.decode_kv_cache_memory if role == "decode" else cfg.prefill_kv_cache_memory
    if kv_mem:
        engine = dataclasses.replace(engine, kv_cache_memory=kv_mem)
    return ["worker", "--role", role, "--router", router, *to_argv(engine)]


def deployment_secret(cfg: ServeConfig) -> tuple[bytes, dict[str, str], Path | None]:
    """The deployment secret, the environment that hands it to children, and the private file this
    launcher generated it into (None when the user gave one): ``--secret-file``, else
    ``$MATRIXINFER_SECRET`` or ``$MATRIXINFER_SECRET_FILE`` (inherited by children), else a new one."""
    if cfg.secret_file:
        secret = auth.read_secret_file(cfg.secret_file)
        # the file wins over an inherited variable, in children as here
        return secret, {auth.ENV_SECRET_FILE: str(Path(cfg.secret_file).resolve()), auth.ENV_SECRET: ""}, None
    inherited = auth.load_secret()
    if inherited is not None:
        return inherited, {}, None
    secret = auth.generate_secret()
    path = auth.write_secret_file(secret)
    return secret, {auth.ENV_SECRET_FILE: str(path), auth.ENV_SECRET: ""}, path


def discard_secret(generated: Path | None) -> None:
    """Remove the private secret file (and its directory) that :func:`deployment_secret` generated."""
    if generated is not None:
        generated.unlink(missing_ok=True)
        generated.parent.rmdir()


def serve_pdc(engine_cfg: EngineConfig, cfg: ServeConfig) -> int:
    """Start the deployment and serve until interrupted."""
    import uvicorn

    from matrixinfer.ems.config import parse_size
    from matrixinfer.ems.controller import Controller
    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.serve.api_server import create_app
    from matrixinfer.serve.cli import print_banner
    from matrixinfer.serve.http_guard import uvicorn_config
    from matrixinfer.serve.router import Router
    from matrixinfer.serve.worker import quiet_gc

    # SIGTERM before uvicorn takes over must still run the cleanup below
    signal.signal(signal.SIGTERM, _interrupt)
    model = Path(engine_cfg.model) if engine_cfg.model else default_model_path()
    engine_cfg = dataclasses.replace(engine_cfg, model=str(model))
    ems_capacity = parse_size(cfg.ems_capacity)
    try:
        secret, secret_env, generated = deployment_secret(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if generated is not None:
        log.info("deployment secret generated in %s (workers joining from elsewhere: --secret-file)", generated)
    children = Children()
    # The controller and EMS servers bind the router's --host: workers on other hosts must reach them.
    controller = Controller(cfg.host, 0, secret=secret).start() if cfg.num_ems > 0 else None
    router = Router(model, engine_cfg.served_model_name, reserve_timeout=cfg.reserve_timeout,
                    ems_controller=controller.address if controller else "", secret=secret,
                    frozen_after=cfg.frozen_after)

    async def main() -> None:
        ctrl = await router.start(cfg.host, cfg.control_port)
        try:
            for i in range(cfg.num_ems):
                assert controller is not None
                p = children.start(f"ems{i}", ["ems-server", "--capacity", str(ems_capacity),
                                               "--listen", f"{cfg.host}:0", "--controller", controller.address],
                                   secret_env, role="ems")
                addr = await asyncio.to_thread(_wait_line, p, r"listening on (\S+)", 60, f"ems{i}")
                _drain(p, f"ems{i}")
                log.info("EMS server %d at %s", i, addr)
            # Share the cores: oversubscribed intra-op thread pools spin against each other.
            threads = cfg.worker_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.num_prefill + cfg.num_decode))
            env = {**secret_env, "MATRIXINFER_THREADS": str(envs.threads() or threads), PROGRESS_ENV: "1",
                   # huge pages for weight and KV allocations: first-touch of 4 KB pages dominates loading
                   "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}
            for role, n in (("prefill", cfg.num_prefill), ("decode", cfg.num_decode)):
                for i in range(n):
                    _drain(children.start(f"{role}{i}", worker_args(engine_cfg, cfg, role, ctrl), env, role=role),
                           f"{role}{i}")
            supervisor = asyncio.create_task(children.supervise())  # noqa: F841 - runs until children.stop()
            await router.wait_for(cfg.num_prefill, cfg.num_decode, timeout=600)
            quiet_gc()
            app = create_app(router, api_key=cfg.api_key, max_request_bytes=cfg.max_request_bytes,
                             reasoning_parser=cfg.reasoning_parser, protect_metrics=cfg.protect_metrics,
                             chat_template=cfg.chat_template, tool_call_parser=cfg.tool_call_parser)
            app.state.metrics.registry.register(SupervisionCollector(children))
            print_banner(f"MatrixInfer PDC serving '{router.model_id}' ({cfg.num_prefill} prefill, {cfg.num_decode} "
                         f"decode, {cfg.num_ems} EMS server(s); workers join at {ctrl})", router.model_id, cfg)
            server = uvicorn.Server(uvicorn_config(app, cfg))
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
        discard_secret(generated)
    return 0
