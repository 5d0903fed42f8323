"""Hosts for multi-host tests: one network namespace per host, joined by veth links to a bridge.

Each host has its own address on a /24, so traffic between hosts crosses veth links and the
same-host paths (EMS shared memory, loopback) are not taken. The bridge lives in a namespace of its
own, so hosts of different tests never share a link. Needs Linux, root and iproute2's ``ip``;
:class:`NetnsHosts` skips the test with the reason otherwise. Use it through the ``netns_hosts``
fixture (tests/conftest.py), which tears the hosts down after the test.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from matrixinfer.ems.arena import remove_orphan_segments
from tests.helpers import REPO, python_env

SUBNET = "10.203.0"  # hosts get .1, .2, ... in the order they are named
_serial = itertools.count()


@dataclass(frozen=True)
class Host:
    """One "host": a network namespace and its address."""

    namespace: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class NetnsHosts:
    """Hosts named ``names`` on one bridge, ``hosts[name]`` each.

    :meth:`close` stops the processes started through :meth:`start` or handed to :meth:`track`,
    kills anything else still running in the namespaces (children of those processes), deletes the
    namespaces and unlinks the shared-memory arenas of EMS servers that were killed.
    """

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        if sys.platform != "linux":
            pytest.skip("multi-host test needs Linux network namespaces")
        if os.geteuid() != 0:
            pytest.skip("multi-host test needs root to create network namespaces (ip netns)")
        if not shutil.which("ip"):
            pytest.skip("multi-host test needs iproute2's `ip` (apt-get install iproute2)")
        prefix = f"mi{os.getpid() % 100000}{next(_serial)}"  # interface names stay under 16 characters
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.hosts: dict[str, Host] = {}
        switch = f"{prefix}sw"
        try:
            try:
                _ip("netns", "add", switch)
            except (subprocess.CalledProcessError, OSError) as exc:
                pytest.skip(f"cannot create network namespaces here: {getattr(exc, 'stderr', exc)!r}")
            self.namespaces.append(switch)
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for i, name in enumerate(names):
                host = Host(f"{prefix}{name}", f"{SUBNET}.{i + 1}")
                ns, a, b = host.namespace, f"{prefix}v{i}a", f"{prefix}v{i}b"
                _ip("netns", "add", ns)
                self.namespaces.append(ns)
                _ip("-n", switch, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
                _ip("-n", switch, "link", "set", a, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", b)
                _ip("-n", ns, "link", "set", b, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.hosts[name] = host
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Stop ``proc`` at :meth:`close` (if it is still running then)."""
        self.procs.append(proc)
        return proc

    def start(self, name: str, argv: list[str], log: Path, **env: str) -> subprocess.Popen:
        """Run ``argv`` on host ``name`` with the repository importable, its output going to ``log``
        (a file, not a pipe: nobody drains a pipe while the test waits)."""
        with open(log, "w") as f:
            proc = subprocess.Popen(self.hosts[name].command(*argv), stdout=f, stderr=subprocess.STDOUT,
                                    env=python_env(**env), cwd=REPO)
        return self.track(proc)

    def run_python(self, name: str, script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """``python -c script args`` on host ``name``, to completion, its output captured as text."""
        return subprocess.run(self.hosts[name].command(sys.executable, "-c", script, *args), capture_output=True,
                              text=True, env=python_env(), cwd=REPO, timeout=timeout)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()
        for ns in self.namespaces:
            _kill_namespace_processes(ns)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.namespaces.clear()
        remove_orphan_segments()


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process still running in network namespace ``ns`` (all of them are the test's)."""
    run = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20)
    for pid in run.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
