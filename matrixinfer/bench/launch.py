"""Start ``matrixinfer serve`` as a child process and read its metrics (benchmarks and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``matrixinfer serve`` process on loopback; ``url`` is its base URL.

    Its output goes to a log file (an undrained pipe would block a chatty server).
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "matrixinfer.cli", "serve", "--port", str(self.port), *args]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="matrixinfer-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
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
        with open(self.log.name) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        """Unlabelled metrics ``{name: value}``."""
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def instance_metrics(self) -> dict[str, dict[str, float]]:
        """PDC per-instance gauges ``{metric: {instance: value}}``."""
        out: dict[str, dict[str, float]] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("matrixinfer_instance_"):
                name, rest = line.split("{", 1)
                labels, value = rest.rsplit(" ", 1)
                inst = labels.split('instance="', 1)[1].split('"', 1)[0]
                out.setdefault(name[len("matrixinfer_instance_"):], {})[inst] = float(value)
        return out

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
