"""Decode inter-token latency under a stream of long prefills: P/D disaggregation vs colocated.

Each mode is measured twice in the same run: decode streams alone, then the same decode streams
while long prompts arrive open loop, at the same fixed rate in both modes (``--prefill-rate`` per
second, whether or not earlier ones finished), so both modes face the same load; the achieved
prefill rate (prefills finished inside the decode window per second) is printed beside each p99.
A closed loop (the next prefill sent when the last one finished) let the faster mode take more
prefills and compared unequal loads. P/D mode pins the prefill instance to core 0 and the
decode instance (with the router and this client) to core 1; the colocated engine gets both cores.
About 1,000 inter-token gaps per figure keep the p99 from resting on a handful of samples.
The bar: in P/D mode the loaded p99 inter-token latency stays within 1.3x of the unloaded one.

    python benchmarks/pd_interference.py [--model DIR] [--decode-streams 4] [--prompt-len 1536]
                                         [--prefill-rate 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import httpx
from tqdm import tqdm

from matrixinfer.bench.client import parse_sse_line
from matrixinfer.bench.launch import ServerProcess, pin_process


async def decode_stream(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], n: int,
                        gaps: list[float], bar: tqdm) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    last = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            now = time.perf_counter()
            chunk = parse_sse_line(line)
            if not isinstance(chunk, dict):  # not a data line, or [DONE]
                continue
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if not chunk["choices"]:
                continue
            if last is not None:
                gaps.append(now - last)
            last = now
            bar.update(1)


async def prefill_load(client: httpx.AsyncClient, url: str, model: str, prompts: list[list[int]], rate: float,
                       stop: asyncio.Event, finished: list[float]) -> list[asyncio.Task]:
    """Open loop: a long prefill every ``1 / rate`` seconds until ``stop``; each one's finish time
    goes to ``finished``. Returns the requests' tasks (the caller cancels those still running)."""
    async def one(prompt: list[int]) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        finished.append(time.perf_counter())

    tasks: list[asyncio.Task] = []
    due = time.perf_counter()
    while not stop.is_set():
        tasks.append(asyncio.create_task(one(prompts[len(tasks) % len(prompts)])))
        due += 1.0 / rate
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))
        except TimeoutError:
            pass
    return tasks


async def measure(url: str, model: str, args, vocab: int, loaded: bool, label: str) -> dict:
    rng = random.Random(args.seed + loaded)
    prompts = [[rng.randrange(10, vocab) for _ in range(32)] for _ in range(args.decode_streams)]
    long_prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(8)]
    gaps: list[float] = []
    finished: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        with tqdm(total=args.decode_streams * args.output_len, desc=label, unit="tok") as bar:
            load = asyncio.create_task(prefill_load(client, url, model, long_prompts, args.prefill_rate, stop,
                                                    finished)) if loaded else None
            if loaded:
                await asyncio.sleep(0.5)  # the prefill stream is under way before decoding starts
            start = time.perf_counter()
            await asyncio.gather(*[decode_stream(client, url, model, p, args.output_len, gaps, bar) for p in prompts])
            end = time.perf_counter()
            stop.set()
            sent = 0
            if load:
                tasks = await load
                sent = len(tasks)
                for t in tasks:  # prefills still queued are dropped (their requests are aborted)
                    t.cancel()
                errors = [r for r in await asyncio.gather(*tasks, return_exceptions=True)
                          if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
                if errors:
                    raise RuntimeError(f"{len(errors)} prefill request(s) failed: {errors[0]!r}")
    gaps.sort()
    in_window = sum(start <= t <= end for t in finished)
    return {"p50_ms": 1000 * statistics.median(gaps), "p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
            "mean_ms": 1000 * statistics.mean(gaps), "gaps": len(gaps), "window_s": end - start,
            "prefills_sent": sent, "prefills_in_window": in_window, "prefill_rate": in_window / (end - start)}


def run_mode(mode: str, args, model_dir: str) -> dict:
    common = ["--model", model_dir, "--served-model-name", "bench", "--log-level", "warning",
              "--kv-cache-memory", str(256 << 20), "--max-num-batched-tokens", str(args.chunk)]
    if mode == "pd":
        server = ServerProcess(common + ["--num-prefill", "1", "--num-decode", "1", "--num-ems", "0"],
                               env={"MATRIXINFER_THREADS": "1"})
        # The prefill instance alone on core 0; the decode instance shares core 1 with the router,
        # which relays its tokens, and with this client.
        pin_process(server.child_pid("--role prefill"), {0})
        pin_process(server.child_pid("--role decode"), {1})
        pin_process(server.proc.pid, {1})
    else:
        server = ServerProcess(common + ["--colocated"], env={"MATRIXINFER_THREADS": "2"})
    try:
        vocab = httpx.get(f"{server.url}/v1/models").json()["data"][0]["vocab_size"]
        out = {}
        for loaded in (False, True):
            label = f"{mode} {'with prefill load' if loaded else 'decode only'}"
            out["loaded" if loaded else "idle"] = asyncio.run(measure(server.url, "bench", args, vocab, loaded, label))
        out["ratio_p99"] = out["loaded"]["p99_ms"] / out["idle"]["p99_ms"]
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--decode-streams", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=2048,
                    help="tokens per decode stream: the window must span several prefills (at 256 the demo model's "
                         "decode, ~4 ms per token, ended its window before the first 1536-token prefill finished)")
    ap.add_argument("--prompt-len", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=512, help="prefill token budget per engine step")
    ap.add_argument("--prefill-rate", type=float, default=0.5,
                    help="long prefills sent per second, open loop, the same in both modes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("this benchmark pins prefill and decode to different cores: it needs 2 CPUs")
    from matrixinfer.model.default_model import default_model_path

    model_dir = args.model or str(default_model_path())
    pin_process(os.getpid(), {1})
    results = {mode: run_mode(mode, args, model_dir) for mode in ("pd", "colocated")}
    print(f"\ndecode inter-token latency, {args.decode_streams} streams, prefills of {args.prompt_len} tokens "
          f"sent open loop at {args.prefill_rate:g}/s:")
    print(f"{'mode':<10} {'idle p50':>9} {'idle p99':>9} {'load p50':>9} {'load p99':>9} {'p99 ratio':>10} "
          f"{'prefills/s done':>16}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['idle']['p50_ms']:>8.1f}ms {r['idle']['p99_ms']:>8.1f}ms {r['loaded']['p50_ms']:>8.1f}ms "
              f"{r['loaded']['p99_ms']:>8.1f}ms {r['ratio_p99']:>9.2f}x {r['loaded']['prefill_rate']:>15.2f}")
    rates = [r["loaded"]["prefill_rate"] for r in results.values()]
    if min(rates) < 0.8 * args.prefill_rate:
        print(f"NOTE: a mode finished fewer prefills than were sent ({min(rates):.2f}/s of {args.prefill_rate:g}/s): "
              "it could not keep up, so its loads are not equal; lower --prefill-rate")
    ok = results["pd"]["ratio_p99"] <= 1.3
    verdict = "PASS" if ok else "FAIL"
    if min(rates) == 0.0:  # the loaded window ended before any prefill finished: no load was measured
        verdict = "INVALID (no prefill finished inside a decode window: raise --output-len)"
    print(f"RESULT P/D p99 ratio {results['pd']['ratio_p99']:.2f}x (bar <= 1.3): {verdict}; "
          f"colocated {results['colocated']['ratio_p99']:.2f}x for contrast")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
