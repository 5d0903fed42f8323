"""The Ray actors of a deployment: the router (with the API and the EMS controller) and one actor
per engine rank or EMS server.

A :class:`ProcessActor` runs one MatrixInfer process (``matrixinfer worker ...`` or an EP rank's
``matrixinfer serve --node-rank K``) as its child and lives exactly as long as it: the child gets
SIGTERM when the actor dies (Linux parent-death signal) and the actor exits when the child dies,
so Ray's restart of the actor is the restart of the instance. Everything the driver and the actors
exchange through Ray is plain data (strings, numbers, lists, dicts); the serving traffic (control,
KV, EMS) stays on MatrixInfer's own authenticated sockets.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

REGISTERED = re.compile(r"(\S+) registered with router")
NODE_IP = "{node_ip}"
FREE_PORT = "{free_port}"


def _die_with_parent() -> None:
    """In the child: SIGTERM when the actor's process dies, however it dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ProcessActor:
    """One MatrixInfer process under Ray (see the module docstring).

    ``argv`` may hold ``{node_ip}`` (this node's address) and ``{free_port}`` (a port free here,
    chosen once): an EP instance's rank 0 publishes its rendezvous address that way."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        import ray

        self.name = name
        self.ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.port = _free_port(self.ip) if any(FREE_PORT in a for a in argv) else 0
        argv = [a.replace(NODE_IP, self.ip).replace(FREE_PORT, str(self.port)) for a in argv]
        self.instance_id: str | None = None
        self.stopping = False
        self.proc = subprocess.Popen([sys.executable, "-m", "matrixinfer.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **env),
                                     preexec_fn=_die_with_parent)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stderr.write(f"[{self.name}] {line}")  # Ray forwards actor output to the driver's log
            hit = REGISTERED.search(line)
            if hit:
                self.instance_id = hit.group(1)
        code = self.proc.wait()
        if not self.stopping:
            sys.stderr.write(f"[{self.name}] exited with code {code}; its actor exits so that it is restarted\n")
            sys.stderr.flush()
            os._exit(1)

    def info(self) -> dict[str, Any]:
        """Where this runs and what it is: node, address, child pid, its router instance id."""
        return {"name": self.name, "ip": self.ip, "node_id": self.node_id, "port": self.port, "pid": self.proc.pid,
                "actor_pid": os.getpid(), "instance_id": self.instance_id, "alive": self.proc.poll() is None}

    def stop(self) -> int | None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s); the actor stays until killed."""
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.poll()


class RouterActor:
    """The router, the OpenAI API and the EMS controller in one actor (its own event loop thread)."""

    def __init__(self, model: str, served_model_name: str | None, serve: dict[str, Any], secret: str,
                 with_ems: bool) -> None:
        from matrixinfer.cluster.autoscale import ScalingMetrics
        from matrixinfer.config import ServeConfig

        self.cfg = ServeConfig(**serve)
        self.model, self.served_model_name = model, served_model_name
        self.secret = secret.encode()
        self.with_ems = with_ems
        self.scaling = ScalingMetrics()
        self.ready = threading.Event()
        self.error: str | None = None
        self.addr: dict[str, str] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.router: Any = None
        self.server: Any = None
        self.controller: Any = None
        self.metrics_registry: Any = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the driver through addresses()
            self.error = f"{type(exc).__name__}: {exc}"
            self.ready.set()

    async def _main(self) -> None:
        from pathlib import Path

        import ray
        import uvicorn

        from matrixinfer.ems.controller import Controller
        from matrixinfer.netio import format_addr, parse_addr
        from matrixinfer.serve.api_server import create_app
        from matrixinfer.serve.http_guard import uvicorn_config
        from matrixinfer.serve.router import Router

        cfg = self.cfg
        self.loop = asyncio.get_running_loop()
        # bound to a wildcard address, the ports are advertised at this node's address
        here = ray.util.get_node_ip_address() if cfg.host in ("", "0.0.0.0", "::") else cfg.host

        def advertised(addr: str) -> str:
            return format_addr(here, parse_addr(addr)[1])

        self.controller = Controller(cfg.host, 0, secret=self.secret).start() if self.with_ems else None
        ems = advertised(self.controller.address) if self.controller else ""
        self.router = Router(Path(self.model), self.served_model_name, reserve_timeout=cfg.reserve_timeout,
                             ems_controller=ems, secret=self.secret, frozen_after=cfg.frozen_after)
        ctrl = advertised(await self.router.start(cfg.host, cfg.control_port))
        app = create_app(self.router, api_key=cfg.api_key, max_request_bytes=cfg.max_request_bytes,
                         reasoning_parser=cfg.reasoning_parser, protect_metrics=cfg.protect_metrics,
                         chat_template=cfg.chat_template, tool_call_parser=cfg.tool_call_parser)
        app.state.metrics.registry.register(self.scaling)
        self.metrics_registry = app.state.metrics.registry
        self.server = uvicorn.Server(uvicorn_config(app, cfg))
        self.addr = {"http": f"http://{format_addr(here, cfg.port)}", "control": ctrl, "ems_controller": ems}
        serving = asyncio.create_task(self.server.serve())
        while not self.server.started and not serving.done():
            await asyncio.sleep(0.05)
        self.ready.set()
        await serving
        if not self.server.started:
            raise RuntimeError(f"the API server could not listen on {cfg.host}:{cfg.port}")

    def addresses(self, timeout: float = 120.0) -> dict[str, str]:
        """The API URL, the control port and the EMS controller, once they listen (RuntimeError if
        they could not start)."""
        if not self.ready.wait(timeout):
            raise RuntimeError(f"the router did not start within {timeout:.0f} s")
        if self.error:
            raise RuntimeError(f"the router failed: {self.error}")
        return self.addr

    def signals(self) -> dict[str, Any]:
        """What the scaling policy and the driver read: per pool the joined instances, queued and
        running requests, idle instance ids; the TTFT and inter-token latency histograms' (sum, count)."""
        assert self.loop is not None

        async def snapshot() -> dict[str, Any]:
            pools: dict[str, Any] = {}
            for role in ("prefill", "decode"):
                insts = [i for i in self.router.instances.values() if i.info.role == role]
                pools[role] = {
                    "instances": [i.info.instance_id for i in insts],
                    # waiting to be scheduled, or held by the router on the instance but not yet running
                    "queued": sum(max(i.stats.waiting, len(i.requests) - i.stats.running) for i in insts),
                    "running": sum(i.stats.running for i in insts),
                    "idle": [i.info.instance_id for i in insts
                             if not i.requests and i.stats.running == 0 and i.stats.waiting == 0],
                }
            reg, labels = self.metrics_registry, {"model_name": self.router.model_id}
            hist = {k: [reg.get_sample_value(f"{name}_{part}", labels) or 0.0 for part in ("sum", "count")]
                    for k, name in (("ttft", "matrixinfer_time_to_first_token_seconds"),
                                    ("itl", "matrixinfer_inter_token_latency_seconds"))}
            return {"pools": pools, **hist, "time": time.time()}

        return asyncio.run_coroutine_threadsafe(snapshot(), self.loop).result(timeout=10)

    def record(self, role: str, action: str, target: int, reason: str, instances: int) -> None:
        """Export one scaling decision in this router's /metrics."""
        from matrixinfer.cluster.autoscale import Decision, ScaleState

        self.scaling.record(Decision(role, action, target, reason, ScaleState()), instances)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.controller is not None:
            self.controller.stop()
