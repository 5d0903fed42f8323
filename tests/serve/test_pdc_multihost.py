"""Multi-host PDC: the router, a prefill, a decode and an EMS worker each in its own network namespace.

Each "host" is a network namespace with its own address on 10.204.0.0/24, joined by veth links to a
bridge, so the router's control traffic, the KV transfer from prefill to decode and the EMS traffic
all cross veth links (and the EMS same-host shared-memory path is not taken). The workers join with
``matrixinfer worker --router``; the client runs in the router's namespace. Needs root and iproute2;
skipped with the reason otherwise. The checkpoint is read from the shared file system.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrixinfer.config import EngineConfig
from matrixinfer.ems.arena import remove_orphan_segments
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
HOSTS = ["rt", "pf", "dc", "em"]  # router (+ API, EMS controller, one EMS server), prefill, decode, EMS
API_PORT, CTRL_PORT = 8300, 8301
PROMPTS = [[(37 * i + 11 * k) % 250 + 3 for i in range(n)] for k, n in enumerate((9, 30, 47, 70))]
REPEATED = [(7 * i) % 250 + 3 for i in range(200)]  # 12 full blocks of 16
MAX_TOKENS = 12

CLIENT_SCRIPT = r'''
import asyncio, json, sys, time
import httpx
from matrixinfer.ems.connection import server_stats

url, prompts, repeated, max_tokens, em_addr = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]

def metrics():
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("matrixinfer_instance_"):
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit(" ", 1)
            role = labels.split('role="', 1)[1].split('"', 1)[0]
            field = name[len("matrixinfer_instance_"):]
            out.setdefault(field, {}).setdefault(role, 0.0)
            out[field][role] += float(value)
    return out

deadline = time.monotonic() + 90
while True:
    try:
        m = metrics()
        if {"prefill", "decode"} <= set(m.get("running", {})):
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the prefill and decode workers did not register within 90 s")
    time.sleep(0.3)

async def stream(client, prompt):
    ids = []
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for c in chunk["choices"]:
                    ids.extend(c["token_ids"])
    return ids

async def all_prompts():
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*[stream(client, p) for p in prompts])

def complete(prompt):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()

def settled():
    time.sleep(0.6)  # load reports arrive every 0.2 s
    return metrics()

out = {"outputs": asyncio.run(all_prompts())}
out["after_outputs"] = settled()
stored = out["after_outputs"]["ems_stored_blocks"]["prefill"]
first = complete(repeated)
deadline = time.monotonic() + 15  # the prefix blocks are stored asynchronously
while metrics()["ems_stored_blocks"]["prefill"] < stored + 12 and time.monotonic() < deadline:
    time.sleep(0.1)
before = settled()
second = complete(repeated)
out["before_repeat"], out["after_repeat"] = before, settled()
out["repeat_texts"] = [first["choices"][0]["text"], second["choices"][0]["text"]]
out["repeat_cached"] = second["usage"]["prompt_tokens_details"]["cached_tokens"]
out["em_stats"] = server_stats(em_addr)
print(json.dumps(out))
'''


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process still running in network namespace ``ns`` (all of them are ours)."""
    run = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20)
    for pid in run.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture
def hosts():
    """Namespaces rt, pf, dc, em on a bridge; yields ``(namespace name, address)`` per host and a
    process list whose members (and anything else left in the namespaces) the finalizer kills."""
    if sys.platform != "linux":
        pytest.skip("multi-host test needs Linux network namespaces")
    if os.geteuid() != 0:
        pytest.skip("multi-host test needs root to create network namespaces (ip netns)")
    if not shutil.which("ip"):
        pytest.skip("multi-host test needs iproute2's `ip` (apt-get install iproute2)")
    prefix = f"pd{os.getpid() % 100000}"
    created: list[str] = []
    procs: list[subprocess.Popen] = []
    try:
        try:
            _ip("netns", "add", f"{prefix}sw")
        except (subprocess.CalledProcessError, OSError) as exc:
            pytest.skip(f"cannot create network namespaces here: {getattr(exc, 'stderr', exc)!r}")
        created.append(f"{prefix}sw")
        _ip("-n", f"{prefix}sw", "link", "add", "br0", "type", "bridge")
        _ip("-n", f"{prefix}sw", "link", "set", "br0", "up")
        out = {}
        for i, name in enumerate(HOSTS):
            ns, a, b = f"{prefix}{name}", f"{prefix}v{i}a", f"{prefix}v{i}b"
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", f"{prefix}sw", "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
            _ip("-n", f"{prefix}sw", "link", "set", a, "master", "br0", "up")
            out[name] = (ns, f"10.204.0.{i + 1}")
            _ip("-n", ns, "addr", "add", f"{out[name][1]}/24", "dev", b)
            _ip("-n", ns, "link", "set", b, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield out, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ns in created:
            _kill_namespace_processes(ns)  # e.g. the router's EMS server child
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        remove_orphan_segments()  # arenas of EMS servers that were killed


def _start(procs: list, ns: str, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), MATRIXINFER_THREADS="1")
    with open(log, "w") as f:  # a file, not a pipe: nobody drains it while the test waits
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "matrixinfer.cli", *args],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    procs.append(proc)
    return proc


def _wait_for_line(proc: subprocess.Popen, log: Path, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if needle in line:
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {needle!r} from {proc.args[3:8]} (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))


def test_router_workers_and_ems_on_separate_hosts(hosts, tmp_path, served_checkpoint):
    addrs, procs = hosts
    router_addr = addrs["rt"][1]
    model = ["--model", str(served_checkpoint), "--kv-cache-memory", str(8 << 20)]
    router = _start(procs, addrs["rt"][0], [
        "serve", *model, "--served-model-name", "tiny", "--host", router_addr, "--port", str(API_PORT),
        "--router-port", str(CTRL_PORT), "--num-prefill", "0", "--num-decode", "0", "--num-ems", "1",
        "--ems-capacity", "64M", "--log-level", "warning"], tmp_path / "router.log")
    _wait_for_line(router, tmp_path / "router.log", "MatrixInfer PDC serving", 60)
    join = ["--router", f"{router_addr}:{CTRL_PORT}"]
    em = _start(procs, addrs["em"][0], ["worker", "--role", "ems", *join, "--kv-host", addrs["em"][1],
                                        "--ems-capacity", "64M"], tmp_path / "ems.log")
    em_addr = _wait_for_line(em, tmp_path / "ems.log", "EMS server listening on", 30).split()[-1]
    assert em_addr.startswith(addrs["em"][1] + ":")
    # Prefill without a local prefix cache: a repeated prompt can only hit the EMS pool.
    _start(procs, addrs["pf"][0], ["worker", "--role", "prefill", *join, "--kv-host", addrs["pf"][1], *model,
                                   "--no-prefix-caching"], tmp_path / "prefill.log")
    _start(procs, addrs["dc"][0], ["worker", "--role", "decode", *join, "--kv-host", addrs["dc"][1], *model],
           tmp_path / "decode.log")

    client = subprocess.run(
        ["ip", "netns", "exec", addrs["rt"][0], sys.executable, "-c", CLIENT_SCRIPT,
         f"http://{router_addr}:{API_PORT}", json.dumps(PROMPTS), json.dumps(REPEATED), str(MAX_TOKENS), em_addr],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=150)
    assert client.returncode == 0, f"{client.stderr[-3000:]}\n{_logs(tmp_path)}"
    out = json.loads(client.stdout.strip().splitlines()[-1])

    engine = LLMEngine(EngineConfig(model=str(served_checkpoint), kv_cache_memory=8 << 20))
    expect = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert out["outputs"] == expect  # P/D across hosts == the colocated engine, token for token

    m = out["after_outputs"]
    assert m["kv_sent_bytes"]["prefill"] > 0 and m["kv_received_bytes"]["decode"] > 0
    assert m["kv_received_bytes"]["decode"] == m["kv_sent_bytes"]["prefill"]

    before, after = out["before_repeat"], out["after_repeat"]
    first, second = out["repeat_texts"]
    assert second == first
    assert out["repeat_cached"] == 192
    assert after["external_hit_tokens"]["prefill"] - before["external_hit_tokens"]["prefill"] == 192
    assert after["prefix_hit_tokens"]["prefill"] == before["prefix_hit_tokens"]["prefill"] == 0
    # the EMS server on its own host is part of the pool the prefill instance used
    em_ns = out["em_stats"]["namespaces"]
    assert sum(c["dram_entries"] + c["ssd_entries"] for c in em_ns.values()) > 0, out["em_stats"]
