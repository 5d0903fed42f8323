"""Decode inter-token latency under a stream of long prefills: P/D disaggregation vs colocated.

Each mode is measured twice in the same run: decode streams alone, then the same decode streams
while long prompts arrive back to back. P/D mode pins the prefill instance to core 0 and the
decode instance (with the router and this client) to core 1; the colocated engine gets both cores.
About 1,000 inter-token gaps per figure keep the p99 from resting on a handful of samples.
The bar: in P/D mode the loaded p99 inter-token latency stays within 1.3x of the unloaded one.

    python benchmarks/pd_interference.py [--model DIR] [--decode-streams 4] [--prompt-len 1536]
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


async def prefill_load(client: httpx.AsyncClient, url: str, model: str, prompts: list[list[int]],
                       stop: asyncio.Event, counter: list[int]) -> None:
    i = 0
    while not stop.is_set():
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": 1, "temperature": 0}
        r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        counter[0] += 1
        i += 1


async def measure(url: str, model: str, args, vocab: int, loaded: bool, label: str) -> dict:
    rng = random.Random(args.seed + loaded)
    prompts = [[rng.randrange(10, vocab) for _ in range(32)] for _ in range(args.decode_streams)]
    long_prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(8)]
    gaps: list[float] = []
    done = [0]
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        with tqdm(total=args.decode_streams * args.output_len, desc=label, unit="tok") as bar:
            load = asyncio.create_task(prefill_load(client, url, model, long_prompts, stop, done)) if loaded else None
            if loaded:
                await asyncio.sleep(0.5)  # the prefill stream is under way before decoding starts
            await asyncio.gather(*[decode_stream(client, url, model, p, args.output_len, gaps, bar) for p in prompts])
            stop.set()
            if load:
                await load
    gaps.sort()
    return {"p50_ms": 1000 * statistics.median(gaps), "p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
            "mean_ms": 1000 * statistics.mean(gaps), "gaps": len(gaps), "prefills_completed": done[0]}


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
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=512, help="prefill token budget per engine step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("this benchmark pins prefill and decode to different cores: it needs 2 CPUs")
    from matrixinfer.model.default_model import default_model_path

    model_dir = args.model or str(default_model_path())
    pin_process(os.getpid(), {1})
    results = {mode: run_mode(mode, args, model_dir) for mode in ("pd", "colocated")}
    print(f"\ndecode inter-token latency, {args.decode_streams} streams, prefills of {args.prompt_len} tokens:")
    print(f"{'mode':<10} {'idle p50':>9} {'idle p99':>9} {'load p50':>9} {'load p99':>9} {'p99 ratio':>10} "
          f"{'prefills':>9}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['idle']['p50_ms']:>8.1f}ms {r['idle']['p99_ms']:>8.1f}ms {r['loaded']['p50_ms']:>8.1f}ms "
              f"{r['loaded']['p99_ms']:>8.1f}ms {r['ratio_p99']:>9.2f}x {r['loaded']['prefills_completed']:>9}")
    ok = results["pd"]["ratio_p99"] <= 1.3
    print(f"RESULT P/D p99 ratio {results['pd']['ratio_p99']:.2f}x (bar <= 1.3): {'PASS' if ok else 'FAIL'}; "
          f"colocated {results['colocated']['ratio_p99']:.2f}x for contrast")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
