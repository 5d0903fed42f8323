"""A local two-node Ray cluster for the tests: a head and a second node on loopback, each a
``ray start --block`` process in its own session, torn down by process group (only what it started)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from matrixinfer.bench.launch import free_port

RAY = Path(sys.executable).with_name("ray")


class LocalRayCluster:
    """``nodes`` Ray nodes on this host; ``address`` is the head's GCS address."""

    def __init__(self, cpus_per_node: float = 3, nodes: int = 2, timeout: float = 120.0) -> None:
        self.tmp = tempfile.mkdtemp(prefix="mi-ray-")  # short: Ray's unix socket paths must stay short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        common = ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                  "--num-cpus", str(cpus_per_node), "--num-gpus", "0"]
        env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
        self.log = open(Path(self.tmp) / "nodes.log", "w")  # noqa: SIM115 - open while the nodes run
        head = [str(RAY), "start", "--head", "--port", str(self.port), "--temp-dir", self.tmp,
                "--include-dashboard", "false", "--resources", json.dumps({"node0": 1}), *common]
        self.procs.append(subprocess.Popen(head, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))
        self._wait_nodes(1, timeout)
        for i in range(1, nodes):
            cmd = [str(RAY), "start", "--address", self.address, "--resources", json.dumps({f"node{i}": 1}), *common]
            self.procs.append(subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True))
        self._wait_nodes(nodes, timeout)

    def _wait_nodes(self, n: int, timeout: float) -> None:
        """Until ``n`` nodes said they started (each ``ray start`` prints it once its node is registered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Ray node exited:\n{self.output()[-3000:]}")
            if self.output().count("Ray runtime started") >= n:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{n} Ray node(s) not up within {timeout:.0f} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return (Path(self.tmp) / "nodes.log").read_text()

    def stop(self) -> None:
        """SIGTERM each node's session (``ray start --block`` stops its node's processes), then SIGKILL
        what is left of those sessions after 2 s (the sessions never exited within 10 s here: the
        grace period was the whole 10 s of every teardown)."""
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
