"""Fixtures that run real EMS server processes on loopback and always kill them."""

from __future__ import annotations

import pytest

from tests.helpers import spawn


class ServerHandle:
    """One server process; ``kill()`` is SIGKILL (a crash), ``restart()`` reuses its port and SSD dir."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc, self.addr = spawn(args)
        self.pids = [self.proc.pid]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()

    def restart(self) -> None:
        self.kill()
        args = [a for a in self.args]
        i = args.index("--listen")
        args[i + 1] = self.addr
        self.proc, self.addr = spawn(args)
        self.pids.append(self.proc.pid)


@pytest.fixture
def ems_servers(tmp_path):
    """``start(capacity="64M", ssd=None, extra=[])`` launches a server; all are killed afterwards."""
    started: list[ServerHandle] = []

    def start(capacity: str = "64M", ssd: str | None = None, extra: list[str] | None = None) -> ServerHandle:
        args = ["--capacity", capacity, "--listen", "127.0.0.1:0", *(extra or [])]
        if ssd:
            d = tmp_path / f"ssd{len(started)}"
            args += ["--ssd-dir", str(d), "--ssd-capacity", ssd]
        handle = ServerHandle(args)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.kill()  # a killed server leaves no shared-memory segment (its arena is a memfd)
