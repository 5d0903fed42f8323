"""An EP instance over two "hosts" (network namespaces, tests/netns.py): node 0 serves the API
and runs rank 0, node 1 runs rank 1 (``matrixinfer serve --ep 2 --nnodes 2 --node-rank 1``); every
dispatch and combine crosses the veth link. Greedy outputs equal one process's. Needs root and
iproute2 (skipped with the reason otherwise). Costs ~60-110 s on 2 busy cores (two servers start)."""

from __future__ import annotations

import json
import subprocess
import sys

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams

API_PORT, MASTER_PORT = 8310, 8311
PROMPTS = [[(37 * i + 11 * k) % 250 + 3 for i in range(n)] for k, n in enumerate((9, 30, 47, 12))]

CLIENT_SCRIPT = r'''
import json, sys, time
import httpx
url, prompts = sys.argv[1], json.loads(sys.argv[2])
deadline = time.monotonic() + 150
while True:
    try:
        if httpx.get(f"{url}/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the EP instance did not become healthy within 150 s")
    time.sleep(0.5)
import asyncio
from tests.serve.helpers import stream_tokens

async def run():
    async with httpx.AsyncClient(timeout=120) as client:
        body = {"model": "tiny", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        runs = [stream_tokens(client, url, dict(body, prompt=p), headers={}) for p in prompts]
        return [ids for ids, _ in await asyncio.gather(*runs)]  # at once: both ranks get requests

outs = asyncio.run(run())
snap = httpx.get(f"{url}/ep/load", timeout=10).json()
print(json.dumps({"outputs": outs, "tokens": [r["tokens"] for r in snap["ranks"]],
                  "remote_bytes": [r["dispatch_bytes"] for r in snap["ranks"]]}))
'''


def _ifname(ns: str) -> str:
    """The namespace's link to the bridge (gloo must not pick loopback)."""
    out = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": lo:" not in line)


def test_ep_instance_over_two_hosts(netns_hosts, served_checkpoint, tmp_path):
    hosts = netns_hosts("n0", "n1")
    a, b = hosts["n0"], hosts["n1"]
    common = ["--model", str(served_checkpoint), "--served-model-name", "tiny", "--device", "cpu",
              "--dtype", "float32", "--kv-cache-memory", str(4 << 20), "--ep", "2", "--nnodes", "2",
              "--master-addr", a.address, "--master-port", str(MASTER_PORT), "--ep-timeout", "30"]
    cli = [sys.executable, "-m", "matrixinfer.cli", "serve"]
    hosts.start("n1", [*cli, *common, "--node-rank", "1"], tmp_path / "n1.log", MATRIXINFER_THREADS="1",
                GLOO_SOCKET_IFNAME=_ifname(b.namespace))
    hosts.start("n0", [*cli, *common, "--node-rank", "0", "--colocated", "--host", a.address, "--port",
                       str(API_PORT)], tmp_path / "n0.log", MATRIXINFER_THREADS="1",
                GLOO_SOCKET_IFNAME=_ifname(a.namespace))
    res = hosts.run_python("n0", CLIENT_SCRIPT, f"http://{a.address}:{API_PORT}", json.dumps(PROMPTS), timeout=300)
    logs = "\n".join(f"--- {n}\n{(tmp_path / f'{n}.log').read_text()[-3000:]}" for n in ("n0", "n1"))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{logs}"
    got = json.loads(res.stdout.strip().splitlines()[-1])
    expect = LLMEngine(EngineConfig(model=str(served_checkpoint), device="cpu", dtype="float32",
                                    kv_cache_memory=4 << 20)).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert got["outputs"] == expect
    assert all(n > 0 for n in got["remote_bytes"]), "no dispatch crossed between the hosts"
