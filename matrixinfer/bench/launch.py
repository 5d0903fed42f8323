"""Start ``matrixinfer serve`` as a child process and read its Prometheus metrics (benchmarks and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

INSTANCE_PREFIX = "matrixinfer_instance_"


def unlabelled_metrics(text: str) -> dict[str, float]:
    """``{sample name: value}`` of the samples without labels in Prometheus exposition ``text``
    (``model_name``, which every MatrixInfer series carries, does not count)."""
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not set(s.labels) - {"model_name"}}


def instance_metrics(text: str, by: str = "instance") -> dict[str, dict[str, float]]:
    """The per-instance gauges of a PDC deployment in ``text``, ``{field: {label value: value}}``, keyed
    by the ``instance`` label or, with ``by="role"``, summed per role."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(INSTANCE_PREFIX):
                field = out.setdefault(s.name[len(INSTANCE_PREFIX):], {})
                field[s.labels[by]] = field.get(s.labels[by], 0.0) + s.value
    return out


def free_port(pair: bool = False) -> int:
    """A TCP port free on loopback right now; ``pair``: the port after it is free too (``serve``
    puts its router's control port at ``--port + 1``)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of consecutive ports on loopback")


class ServerProcess:
    """A ``matrixinfer serve`` process on loopback; ``url`` is its base URL.

    Its output goes to a log file (an undrained pipe would block a chatty server).
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 180.0) -> None:
        self.port = free_port(pair=True)
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "matrixinfer.cli", "serve", "--port", str(self.port), *args]
        fd, self.log_path = tempfile.mkstemp(prefix="matrixinfer-server-", suffix=".log")  # kept after stop()
        with os.fdopen(fd, "w") as log:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                         env=dict(os.environ, **(env or {})))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become healthy within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        """Everything the server has printed so far."""
        with open(self.log_path) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        """Unlabelled metrics ``{sample name: value}`` (counters with their ``_total`` suffix)."""
        return unlabelled_metrics(self._scrape())

    def instance_metrics(self) -> dict[str, dict[str, float]]:
        """PDC per-instance gauges ``{metric: {instance: value}}``."""
        return instance_metrics(self._scrape())

    def _scrape(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def children(self) -> list[tuple[int, str]]:
        """Direct child processes (pid, command line): the workers and EMS servers in PDC mode."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    with open(f"/proc/{entry}/cmdline") as f:
                        out.append((int(entry), f.read().replace("\0", " ")))
            except (OSError, ValueError, IndexError):
                continue
        return sorted(out)

    def child_pid(self, needle: str, index: int = 0) -> int:
        """PID of the ``index``-th child whose command line contains ``needle``."""
        return [pid for pid, cmd in self.children() if needle in cmd][index]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads started later inherit from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass
