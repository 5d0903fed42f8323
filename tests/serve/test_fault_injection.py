"""Fault injection against a real P/D deployment (issue 19's bar): garbage, oversized frames and bad
proofs on every port, and kill -9 / SIGSTOP of the prefill worker, the decode worker and the EMS
server while requests stream. After each fault: no request hangs (each ends, finished or with a clean
error, within a bound), /health tells the truth, the service is restored (the launcher restarts what
died, the router takes it back), and every KV block and reservation is reclaimed.

One deployment serves the whole module (router + 1 prefill + 1 decode + 1 EMS server). Costs about
90 s on 2 quiet cores: each kill waits for a restarted worker to start Python and torch and build the
model (6.8 s from kill -9 of the decode worker to a served request, 5.8 s for the prefill worker,
measured quiet), each SIGSTOP of a worker waits for the router's frozen-instance bound (4 s here). The
restoration bound is the issue's 15 s; on a machine shared with other heavy jobs (load 10+ on 2
cores measured 14-43 s) set ``MATRIXINFER_TEST_RESTORE_BOUND_S`` higher. Run with ``-s`` to see the
measured restoration times.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import threading
import time

import httpx
import pytest

from matrixinfer import auth
from tests.serve.helpers import API_KEY, HEADERS, Server, child_restarts, listening_ports, stream_tokens

REQUEST_BOUND_S = 40.0  # no request may take longer than this, whatever fault it meets
# a killed worker is back and serving within this (issue 19's bar; see the module docstring for figures)
RESTORE_BOUND_S = float(os.environ.get("MATRIXINFER_TEST_RESTORE_BOUND_S", "15"))
# an instance silent this long is frozen to the router (--frozen-after; the default 10 s made each
# SIGSTOP of a worker wait 10 s, and load reports come every 0.2 s)
FROZEN_AFTER_S = 4.0


@pytest.fixture(scope="module")
def pd(served_checkpoint):
    srv = Server(served_checkpoint, "--num-prefill", "1", "--num-decode", "1", "--num-ems", "1",
                 "--kv-cache-memory", str(8 << 20), "--reserve-timeout", "10", "--ems-capacity", "32M",
                 "--max-num-batched-tokens", "64", "--store-decode-kv",  # decode writes to EMS as it streams
                 "--frozen-after", str(FROZEN_AFTER_S), api_key=API_KEY)
    yield srv
    srv.stop()


def _healthy(server: Server) -> bool:
    return httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def _complete_ok(server: Server) -> bool:
    body = {"model": "tiny", "prompt": [7] * 24, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=REQUEST_BOUND_S)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def _wait_restored(server: Server, since: float) -> float:
    """Seconds from ``since`` until /health is 200 and a request is served (AssertionError past the bound)."""
    while time.monotonic() - since < RESTORE_BOUND_S:
        if _healthy(server) and _complete_ok(server):
            return time.monotonic() - since
        time.sleep(0.3)
    raise AssertionError(f"not restored within {RESTORE_BOUND_S} s:\n{server.output()[-3000:]}")


def _wait_reclaimed(server: Server, timeout: float = 30.0) -> dict[str, dict[str, float]]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.instance_metrics()
        held = {k: v for f in ("kv_used", "reserved_blocks", "running", "waiting") for k, v in m.get(f, {}).items()
                if v}
        if not held:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks or requests still held after {timeout} s: {held}")
        time.sleep(0.25)


async def _load_then(server: Server, fault, role: str, n: int = 4, max_tokens: int = 96
                     ) -> list[tuple[list[int], str | None]]:
    """Stream ``n`` requests with ``fault()`` applied while they are in flight, and return every
    result. Decode, EMS: once every stream has its first token from the decode instance (its second).
    Prefill: just before they are sent, since the tiny model prefills in milliseconds, so every prompt
    goes to the faulty instance. A request that takes longer than REQUEST_BOUND_S fails the test (a
    hang)."""
    if role == "prefill":
        await asyncio.to_thread(fault)
    async with httpx.AsyncClient(timeout=REQUEST_BOUND_S) as client:
        prompt_len = 300 if role == "prefill" else 40  # long prompts keep the prefill instance busy

        decoding = [asyncio.Event() for _ in range(n)]

        async def one(k: int) -> tuple[list[int], str | None]:
            body = {"model": "tiny", "prompt": [11 + k] * prompt_len, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            try:
                return await asyncio.wait_for(stream_tokens(client, server.url, body, started=decoding[k],
                                                            started_at=2), REQUEST_BOUND_S)
            except TimeoutError:
                return [], "hung"
            except AssertionError as exc:  # not a stream: refused before it started (e.g. 503)
                refused = "'error'" in str(exc) or '"error"' in str(exc)
                return [], f"error: refused ({exc})" if refused else f"unclean: {exc!r}"
            except httpx.HTTPError as exc:  # the connection was cut mid-stream
                return [], f"unclean: {exc!r}"

        tasks = [asyncio.create_task(one(k)) for k in range(n)]
        if role != "prefill":  # (polling the metrics for a running request let a fast machine finish first)
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in decoding)), 15)
            await asyncio.to_thread(fault)
        return await asyncio.gather(*tasks)


def _clean(server: Server, results: list[tuple[list[int], str | None]], max_tokens: int = 96) -> None:
    """Every request finished or ended with an error event (no hang, no cut connection, no 5xx status)."""
    for ids, reason in results:
        ok = reason == "length" and len(ids) == max_tokens or (reason or "").startswith("error:")
        assert ok, f"{reason} after {len(ids)} tokens; server log:\n{server.output()[-4000:]}"


def test_the_secret_reaches_children_by_a_private_file_never_their_command_line(pd):
    pids = [pd.proc.pid] + [pid for pid, _ in pd.children()]
    with open(f"/proc/{pids[1]}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    path = env[auth.ENV_SECRET_FILE.encode()].decode()
    assert os.stat(path).st_mode & 0o777 == 0o600
    secret = auth.read_secret_file(path)
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert secret not in f.read()
    assert secret.decode() not in pd.output()


# -- garbage on every port ----------------------------------------------------------------------------
GARBAGE = [
    os.urandom(2048),
    b"\x00" * 64,
    b"MIF1" + struct.pack("<I", 0xFFFFFFFF) + b"x" * 100,  # control/KV frame announcing 4 GiB
    b"EMS1" + struct.pack("<I", 0xFFFFFFFF) + b"x" * 100,  # EMS frame announcing 4 GiB
    auth.MAGIC + os.urandom(auth.NONCE) + os.urandom(auth.MAC),  # the handshake with a forged proof
]


def _send_and_wait_close(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(data)
            while s.recv(65536):  # the port answers (a challenge, an HTTP error) and closes
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            raise AssertionError(f"port {port} kept a connection with {data[:12]!r}... open for 15 s") from None


def test_garbage_and_oversized_frames_on_every_port_cost_nothing(pd):
    launcher_ports = listening_ports(pd.proc.pid)  # API, router control, EMS controller
    children = {name: pd.child_pid(name) for name in ("--role prefill", "--role decode", "ems-server")}
    ports = {"launcher": launcher_ports, "decode (KV)": listening_ports(children["--role decode"]),
             "ems server": listening_ports(children["ems-server"])}
    assert len(launcher_ports) == 3 and ports["decode (KV)"] and ports["ems server"], ports
    before = child_restarts(pd)
    idle = [socket.create_connection(("127.0.0.1", p)) for group in ports.values() for p in group]  # silent
    for group in ports.values():
        for port in group:
            for data in GARBAGE:
                # the HTTP port waits for the end of a request line (uvicorn has no header timeout)
                _send_and_wait_close(port, data + b"\r\n\r\n" if port == pd.port else data)
    assert _healthy(pd) and _complete_ok(pd)  # with silent connections still open on every port
    for s in idle:
        s.close()
    assert child_restarts(pd) == before  # nothing died
    assert all(pid in dict(pd.children()) for pid in children.values())
    _wait_reclaimed(pd)


# -- kill -9 and SIGSTOP of each child, under load ---------------------------------------------------------
@pytest.mark.parametrize("role", ["decode", "prefill", "ems"])
def test_kill_9_under_load_recovers_and_reclaims(pd, role):
    needle = "ems-server" if role == "ems" else f"--role {role}"
    pid = pd.child_pid(needle)
    child = f"{role}0"
    before = child_restarts(pd).get(child, 0)
    killed_at: list[float] = []

    def kill_now() -> None:
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    def kill() -> None:
        if role == "prefill":  # hold it, and kill it once the router has handed it every prompt
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(1.5, kill_now).start()
        else:
            kill_now()

    # the decode instance dies with every request mid-stream (40 prompt tokens + 460 fit the model's 512)
    max_tokens = 460 if role == "decode" else 96
    results = asyncio.run(_load_then(pd, kill, role, max_tokens=max_tokens))
    _clean(pd, results, max_tokens)
    if role == "ems":  # the pool is a cache: every request still completes
        assert all(reason == "length" for _, reason in results), results
    else:
        # the only instance of its role died with every request in it: each ends with an error
        assert all((r or "").startswith("error:") for _, r in results), results
        if role == "decode":  # mid-stream: from the decode instance, not refused before it
            assert all(len(ids) >= 2 and "refused" not in (r or "") for ids, r in results), results
        # truthful while it is gone (the router learns of the death from its closed connection: allow it 3 s)
        deadline = time.monotonic() + 3
        while _healthy(pd) and child_restarts(pd).get(child, 0) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _healthy(pd) or child_restarts(pd).get(child, 0) > before
    took = _wait_restored(pd, killed_at[0])
    deadline = time.monotonic() + RESTORE_BOUND_S
    while child_restarts(pd).get(child, 0) != before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert child_restarts(pd).get(child, 0) == before + 1
    errors = sum((r or "").startswith("error:") for _, r in results)
    print(f"\nkill -9 {role}: {errors} of {len(results)} requests ended with an error event, the rest finished; "
          f"service restored {took:.1f} s after the kill")
    _wait_reclaimed(pd)


@pytest.mark.parametrize("role", ["decode", "prefill", "ems"])
def test_sigstop_under_load_ends_requests_cleanly_and_recovers(pd, role):
    needle = "ems-server" if role == "ems" else f"--role {role}"
    pid = pd.child_pid(needle)
    restarts = child_restarts(pd)
    try:
        max_tokens = 460 if role == "decode" else 96  # on a quiet machine 96 tokens finish before the stop lands
        results = asyncio.run(_load_then(pd, lambda: os.kill(pid, signal.SIGSTOP), role, max_tokens=max_tokens))
        _clean(pd, results, max_tokens)
        if role == "ems":
            assert all(reason == "length" for _, reason in results), results
        else:  # every request was on the frozen instance; it stops counting as serving once silent FROZEN_AFTER_S
            assert all((r or "").startswith("error:") for _, r in results), results
        if role == "decode":  # mid-stream: from the decode instance, not refused before it
            assert all(len(ids) >= 2 and "refused" not in (r or "") for ids, r in results), results
            deadline = time.monotonic() + 15
            while _healthy(pd) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _healthy(pd)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    took = _wait_restored(pd, resumed)
    errors = sum((r or "").startswith("error:") for _, r in results)
    print(f"\nSIGSTOP {role}: {errors} of {len(results)} requests ended with an error event, the rest finished; "
          f"service restored {took:.1f} s after SIGCONT")
    assert child_restarts(pd) == restarts  # a stopped child is not killed or restarted
    _wait_reclaimed(pd)
