"""Real API servers on loopback, started as subprocesses of ``matrixinfer serve``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from matrixinfer.model.default_model import write_byte_tokenizer
from tests.checkpoints import make_checkpoint

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``matrixinfer serve`` process; ``url`` is its base URL."""

    def __init__(self, model_dir, *extra: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "matrixinfer.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--served-model-name", "tiny", "--log-level", os.environ.get("MI_TEST_LOG", "warning"), *extra]
        if "--num-prefill" not in extra and "--pdc" not in extra:
            cmd.append("--colocated")
        cmd = [c for c in cmd if c != "--pdc"]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, MATRIXINFER_THREADS="1")
        import tempfile

        # a file, not a pipe: an undrained pipe would block a chatty server
        self.log = tempfile.NamedTemporaryFile("w+", prefix="matrixinfer-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy within 120 s")

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A tiny V3 checkpoint with a byte-level tokenizer (vocab 264 covers its 261 tokens)."""
    path = make_checkpoint(tmp_path_factory.mktemp("served"), "v3", seed=9, vocab_size=264,
                           bos_token_id=256, eos_token_id=257)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(served_checkpoint):
    srv = Server(served_checkpoint, "--kv-cache-memory", str(8 << 20), api_key=API_KEY)
    yield srv
    srv.stop()


def children_of(pid: int) -> list[tuple[int, str]]:
    """Direct child processes of ``pid`` with their command lines."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline") as f:
                    out.append((int(entry), f.read().replace("\0", " ")))
        except (OSError, ValueError, IndexError):
            continue
    return out


def child_pid(server: "Server", needle: str, index: int = 0) -> int:
    """PID of the ``index``-th child whose command line contains ``needle``."""
    pids = sorted(pid for pid, cmd in children_of(server.proc.pid) if needle in cmd)
    return pids[index]


def instance_metrics(server: "Server") -> dict[str, dict[str, float]]:
    """``{metric: {instance: value}}`` of the per-instance gauges."""
    out: dict[str, dict[str, float]] = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("matrixinfer_instance_"):
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit(" ", 1)
            inst = labels.split('instance="', 1)[1].split('"', 1)[0]
            out.setdefault(name[len("matrixinfer_instance_"):], {})[inst] = float(value)
    return out
