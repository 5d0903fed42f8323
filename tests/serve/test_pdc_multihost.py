"""Multi-host PDC: the router, a prefill, a decode and an EMS worker each in its own network namespace.

Each "host" is a network namespace (tests/netns.py), so the router's control traffic, the KV transfer
from prefill to decode and the EMS traffic all cross veth links (and the EMS same-host shared-memory
path is not taken). The workers join with ``matrixinfer worker --router``; the client runs in the
router's namespace. Needs root and iproute2; skipped with the reason otherwise. The checkpoint is
read from the shared file system.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from matrixinfer import auth
from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams

HOSTS = ["rt", "pf", "dc", "em"]  # router (+ API, EMS controller, one EMS server), prefill, decode, EMS
API_PORT, CTRL_PORT = 8300, 8301
PROMPTS = [[(37 * i + 11 * k) % 250 + 3 for i in range(n)] for k, n in enumerate((9, 30, 47, 70))]
REPEATED = [(7 * i) % 250 + 3 for i in range(200)]  # 12 full blocks of 16
MAX_TOKENS = 12

CLIENT_SCRIPT = r'''
import asyncio, json, sys, time
import httpx
from matrixinfer.bench.launch import instance_metrics
from matrixinfer.ems.connection import server_stats
from matrixinfer.auth import read_secret_file
from tests.serve.helpers import stream_tokens

url, prompts, repeated, max_tokens, em_addr = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
secret = read_secret_file(sys.argv[6])

def metrics():
    return instance_metrics(httpx.get(f"{url}/metrics", timeout=5).text, by="role")

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
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    ids, reason = await stream_tokens(client, url, body, headers={})
    assert not (reason or "").startswith("error:"), reason
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
out["em_stats"] = server_stats(em_addr, secret=secret)
print(json.dumps(out))
'''


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


def test_router_workers_and_ems_on_separate_hosts(netns_hosts, tmp_path, served_checkpoint):
    hosts = netns_hosts(*HOSTS)
    router_addr = hosts["rt"].address
    # the deployment secret, shared by every host as a private file (a shared file system stands in for
    # however a real deployment distributes it); workers without it cannot join
    secret_file = auth.write_secret_file(auth.generate_secret(), str(tmp_path))

    def start(host: str, args: list[str], log: str) -> subprocess.Popen:
        return hosts.start(host, [sys.executable, "-m", "matrixinfer.cli", *args], tmp_path / log,
                           MATRIXINFER_THREADS="1", MATRIXINFER_SECRET_FILE=str(secret_file))

    model = ["--model", str(served_checkpoint), "--device", "cpu", "--kv-cache-memory", str(8 << 20)]
    router = start("rt", [
        "serve", *model, "--served-model-name", "tiny", "--host", router_addr, "--port", str(API_PORT),
        "--router-port", str(CTRL_PORT), "--num-prefill", "0", "--num-decode", "0", "--num-ems", "1",
        "--ems-capacity", "64M", "--log-level", "warning"], "router.log")
    _wait_for_line(router, tmp_path / "router.log", "MatrixInfer PDC serving", 60)
    join = ["--router", f"{router_addr}:{CTRL_PORT}"]
    em = start("em", ["worker", "--role", "ems", *join, "--kv-host", hosts["em"].address, "--ems-capacity", "64M"],
               "ems.log")
    em_addr = _wait_for_line(em, tmp_path / "ems.log", "EMS server listening on", 30).split()[-1]
    assert em_addr.startswith(hosts["em"].address + ":")
    # Prefill without a local prefix cache: a repeated prompt can only hit the EMS pool.
    start("pf", ["worker", "--role", "prefill", *join, "--kv-host", hosts["pf"].address, *model,
                 "--no-prefix-caching"], "prefill.log")
    start("dc", ["worker", "--role", "decode", *join, "--kv-host", hosts["dc"].address, *model], "decode.log")
    # an intruder on the decode host, with a secret of its own, is refused and learns nothing
    intruder = hosts.start("dc", [sys.executable, "-m", "matrixinfer.cli", "worker", "--role", "prefill", *join,
                                  "--kv-host", hosts["dc"].address, *model], tmp_path / "intruder.log",
                           MATRIXINFER_THREADS="1", MATRIXINFER_SECRET="intruder-" + "x" * 20)

    client = hosts.run_python("rt", CLIENT_SCRIPT, f"http://{router_addr}:{API_PORT}", json.dumps(PROMPTS),
                              json.dumps(REPEATED), str(MAX_TOKENS), em_addr, str(secret_file), timeout=150)
    assert client.returncode == 0, f"{client.stderr[-3000:]}\n{_logs(tmp_path)}"
    out = json.loads(client.stdout.strip().splitlines()[-1])

    engine = LLMEngine(EngineConfig(model=str(served_checkpoint), device="cpu", dtype="float32",
                                    kv_cache_memory=8 << 20))
    expect = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert out["outputs"] == expect  # P/D across hosts == the colocated engine, token for token
    assert intruder.wait(timeout=30) != 0 and "failed authentication" in (tmp_path / "intruder.log").read_text()

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
