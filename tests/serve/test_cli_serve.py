"""``matrixinfer serve`` as a user starts and stops it: a busy port is found before anything loads,
Ctrl-C stops a PDC deployment without tracebacks, and the API key is never printed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from tests.helpers import REPO, python_env
from tests.serve.helpers import Server


def test_a_busy_port_is_reported_before_anything_starts(served_checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "matrixinfer.cli", "serve", "--model", str(served_checkpoint),
                              "--device", "cpu", "--port", str(port)], capture_output=True, text=True,
                             env=python_env(), cwd=REPO, timeout=60)
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "--port" in out.stderr and "Traceback" not in out.stderr
    assert "prefill" not in out.stdout + out.stderr  # no worker was started
    assert time.monotonic() - t0 < 30


def test_ctrl_c_stops_a_pdc_deployment_quietly_and_the_key_is_not_printed(served_checkpoint):
    server = Server(served_checkpoint, "--num-prefill", "1", "--num-decode", "1", "--num-ems", "1",
                    "--kv-cache-memory", str(8 << 20), "--log-level", "info", api_key="s3cret-key")
    server.proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher (and its group)
    try:
        server.proc.wait(timeout=30)
    finally:
        server.stop()
    log = server.output()
    assert "s3cret-key" not in log and "Authorization: Bearer <your API key>" in log
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
