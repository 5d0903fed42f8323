"""The launcher's supervision of its children (issue 19, critical 2): a child that dies is restarted
after an exponential backoff and counted; one stopped on purpose is left alone. The real-process
version (a killed worker or EMS server comes back and serves) is in test_fault_injection.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from matrixinfer.serve import launcher
from matrixinfer.serve.launcher import RESTART_MAX_S, RESTART_MIN_S, STABLE_AFTER_S, Children, restart_delay


def test_restart_delay_backs_off_and_starts_over_after_a_stable_run():
    assert restart_delay(None, 0.1) == RESTART_MIN_S
    delays = [RESTART_MIN_S]
    for _ in range(8):
        delays.append(restart_delay(delays[-1], 0.5))  # dies again at once
    assert delays[:4] == [RESTART_MIN_S, 2 * RESTART_MIN_S, 4 * RESTART_MIN_S, 8 * RESTART_MIN_S]
    assert delays[-1] == RESTART_MAX_S
    assert restart_delay(RESTART_MAX_S, STABLE_AFTER_S + 1) == RESTART_MIN_S


@pytest.fixture
def children(monkeypatch):
    """Children whose processes are ``python -c CODE`` (``args[0]``) instead of matrixinfer commands."""
    def spawn(args: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", args[0]], stdout=subprocess.PIPE, text=True)

    monkeypatch.setattr(Children, "_spawn", staticmethod(spawn))
    monkeypatch.setattr(launcher, "_drain", lambda proc, name: None)
    kids = Children()
    yield kids
    kids.stop()


def _dead(proc: subprocess.Popen) -> None:
    proc.wait(timeout=10)


def test_a_crashed_child_is_restarted_after_its_delay_and_counted(children):
    proc = children.start("decode0", ["import time; time.sleep(60)"], role="decode")
    proc.kill()  # kill -9
    _dead(proc)
    now = time.monotonic()
    children.check(now)
    child = children.children[0]
    assert child.restarts == 0 and child.restart_at == pytest.approx(now + RESTART_MIN_S)
    children.check(now + RESTART_MIN_S / 2)
    assert child.proc is proc  # not before its delay
    children.check(now + RESTART_MIN_S)
    assert child.restarts == 1 and child.proc is not proc and child.alive
    child.proc.kill()  # dies again at once: the next delay doubles
    _dead(child.proc)
    children.check(now + RESTART_MIN_S + 0.1)
    assert child.delay == 2 * RESTART_MIN_S


@pytest.mark.parametrize("stop", ["exit0", "sigterm", "sigint"])
def test_a_child_stopped_on_purpose_is_not_restarted(children, stop):
    # The child sets the default handlers and says so before it is signalled: a suite started in the
    # background passes SIGINT on ignored, and a signal that arrives before the handler is set is lost.
    code = ("import sys; sys.exit(0)" if stop == "exit0" else
            "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "signal.signal(signal.SIGTERM, signal.SIG_DFL); print('ready', flush=True); time.sleep(60)")
    proc = children.start("prefill0", [code], role="prefill")
    if stop != "exit0":
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM if stop == "sigterm" else signal.SIGINT)
    _dead(proc)
    now = time.monotonic()
    for dt in (0, RESTART_MAX_S, 10 * RESTART_MAX_S):
        children.check(now + dt)
    assert children.children[0].restarts == 0 and children.children[0].proc is proc


def test_nothing_is_restarted_once_the_launcher_stops(children):
    proc = children.start("ems0", ["import time; time.sleep(60)"], role="ems")
    children.stop()
    proc.kill()
    now = time.monotonic()
    children.check(now)
    children.check(now + RESTART_MAX_S)
    assert children.children[0].restarts == 0
