"""EP instances in the default P/D deployment, with the EMS pool: ``matrixinfer serve --num-prefill 1
--num-decode 2 --num-ems 1 --store-decode-kv --ep 2`` (every instance two ranks, its routed experts
spread over both) gives one process's greedy tokens while requests are spread over the ranks' DP
attention schedulers in both roles (the KV handoff passing through rank 0 over the instance's
control channel), every rank with its own EMS connector: a repeated prompt placed on the rank that
did not compute it loads its prefix from EMS. Killing a rank of one decode instance mid-request
ends that request with an error within 30 s, and the router keeps serving with the remaining
instances. Costs ~1.5-2.5 min on 2 busy cores (a router, an EMS server and three EP instances of
two processes each start)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx

from matrixinfer.bench.launch import instance_metrics
from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from tests.serve.helpers import Server, stream_tokens

# prompts 1, 2 and 3 have full blocks (16 tokens): with requests placed on the two ranks in turn, 1 and
# 3 are computed on one rank and 2 on the other, so a repeat of each on each rank has some prefix
# that only EMS holds for it (with only 1 and 3 full, strict alternation put both on rank 1, and their
# repeats hit local caches only: 0 EMS tokens, seen once in a full run)
PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 75)), list(range(230, 250)), list(range(100, 121)), [5] * 12,
           list(range(200, 207))]


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) != pid:
                        continue
                with open(f"/proc/{entry}/cmdline") as f:
                    out.append((int(entry), f.read().replace("\0", " ")))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _wait_instances(server: Server, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            roles = instance_metrics(httpx.get(f"{server.url}/metrics", timeout=5).text, by="role")
            running = roles.get("running", {})
            if "prefill" in running and len(instance_metrics(server._scrape()).get("running", {})) >= 3:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the EP instances did not register:\n{server.output()[-3000:]}")


def test_pd_deployment_of_ep_instances(served_checkpoint):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)  # 16: the requests overlap on decode
    expect = LLMEngine(EngineConfig(model=str(served_checkpoint), device="cpu", dtype="float32",
                                    kv_cache_memory=4 << 20)).generate(PROMPTS, params)
    server = Server(served_checkpoint, "--num-prefill", "1", "--num-decode", "2", "--num-ems", "1", "--ep", "2",
                    "--store-decode-kv", "--ep-timeout", "10", "--kv-cache-memory", str(4 << 20))
    try:
        _wait_instances(server)

        async def run(prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], str | None]]:
            async with httpx.AsyncClient(timeout=180) as client:
                body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
                return list(await asyncio.gather(*[stream_tokens(client, server.url, dict(body, prompt=p), headers={})
                                                   for p in prompts]))

        assert [ids for ids, _ in asyncio.run(run(PROMPTS, 16))] == expect
        # six requests at once: each instance's rank 0 gave some to rank 1 (prefill: to prefill there
        # and hand the KV back; decode: the KV that arrived on rank 0, moved to rank 1 to continue)
        deadline = time.monotonic() + 10  # instances report every 0.2 s; EMS puts finish after the stream
        while True:
            roles = instance_metrics(server._scrape(), by="role")
            remote, stored = roles["ep_remote_requests"], roles["ems_stored_blocks"]
            if (min(remote.get("prefill", 0), remote.get("decode", 0), stored.get("prefill", 0),
                    stored.get("decode", 0)) > 0 or time.monotonic() > deadline):
                break
            time.sleep(0.2)
        print(f"requests placed on rank 1 by role: {remote}; EMS blocks stored by role: {stored}")
        assert remote.get("prefill", 0) > 0 and remote.get("decode", 0) > 0, remote
        assert stored.get("prefill", 0) > 0 and stored.get("decode", 0) > 0, stored  # prompt / generated blocks
        # the prompts with full blocks, each sent twice at once: a copy that goes to the prefill rank that
        # did not compute it before has its prefix only in EMS (through that rank's own client)
        again = [PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[3], PROMPTS[3]]
        assert [ids for ids, _ in asyncio.run(run(again, 16))] == [expect[i] for i in (1, 1, 2, 2, 3, 3)]
        deadline = time.monotonic() + 5  # the instances' next reports (every 0.2 s) carry the hits
        while True:
            roles = instance_metrics(server._scrape(), by="role")
            ems_hits = roles["external_hit_tokens"].get("prefill", 0)
            if ems_hits >= 16 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"repeated prompts: {ems_hits:.0f} prompt tokens loaded from EMS, "
              f"{roles['prefix_hit_tokens'].get('prefill', 0):.0f} from the ranks' own caches")
        assert ems_hits >= 16, roles["external_hit_tokens"]

        decode = [pid for pid, cmd in server.children() if "--role decode" in cmd]
        assert len(decode) == 2
        # a rank of each decode instance: the router usually gives the two requests one instance
        # each, but its view of their load comes from periodic reports, and both requests on the
        # instance whose rank lived made the test fail no request (seen once in a full quiet run)
        victims = [next(pid for pid, cmd in _children(d) if "matrixinfer.parallel.rank" in cmd) for d in decode]

        async def kill_mid_request() -> tuple[list[tuple[list[int], str | None]], float]:
            # the rank dies while both requests are decoding: each is started once the one before has
            # streamed tokens (so the router sees the first decode instance loaded and gives the second
            # to the other), and the kill follows the second's first tokens; fixed sleeps let a fast
            # quiet machine finish both 300-token requests before the kill
            async with httpx.AsyncClient(timeout=180) as client:
                body = {"model": "tiny", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
                started = [asyncio.Event(), asyncio.Event()]
                first = asyncio.create_task(stream_tokens(client, server.url, dict(body, prompt=PROMPTS[0]),
                                                          headers={}, started=started[0]))
                await asyncio.wait_for(started[0].wait(), 60)
                second = asyncio.create_task(stream_tokens(client, server.url, dict(body, prompt=PROMPTS[2]),
                                                           headers={}, started=started[1]))
                await asyncio.wait_for(started[1].wait(), 60)
                for victim in victims:
                    os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                done = await asyncio.gather(first, second)
                return list(done), time.monotonic() - killed

        done, waited = asyncio.run(kill_mid_request())
        errors = [reason for _, reason in done if (reason or "").startswith("error")]
        assert errors, f"no request failed after a rank of its decode instance died: {done}"
        assert waited < 30, f"the requests took {waited:.1f} s to end after the rank died"
        print(f"ranks killed -> {len(errors)} request(s) ended with an error; all ended {waited:.1f} s after")
        # the router serves again once the launcher has restarted the decode instances
        deadline, got = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                got = [ids for ids, _ in asyncio.run(run(PROMPTS, 8))]
            except AssertionError as exc:  # not 200 (503) while no decode instance is registered
                got = str(exc)
            if got == [ids[:8] for ids in expect]:
                break
            time.sleep(1.0)
        assert got == [ids[:8] for ids in expect], got
    finally:
        server.stop()
