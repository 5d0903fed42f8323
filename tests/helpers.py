"""Helpers every test package may use: the repository root and child Python processes that run it."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_env(**extra: str) -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH`` (a child can import ``matrixinfer``
    and ``tests`` from any working directory), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def spawn(args: list[str], prefix: list[str] | None = None, module: str = "matrixinfer.ems.server",
          timeout: float = 20.0) -> tuple[subprocess.Popen, str]:
    """Start ``[*prefix] python -m module args`` and return it with the address from its first stdout
    line (``... listening on HOST:PORT``); a server that does not print one in ``timeout`` s is killed."""
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=python_env(), cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"{module} {args} did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.split()[-1]
