"""The paper's context-cache experiment through EMS: TTFT and prefill throughput at 0%, 50% and
90% prefix reuse, in one run (P/D mode, one prefill and one decode instance, one EMS server).

The prefill instance's own prefix cache is off, so every reused block comes from the pool. For
each reuse level a shared prefix is stored first; then requests with that prefix and unique
suffixes are timed one at a time (TTFT) and all at once (prefill tokens/s). The bar: TTFT at 90%
reuse is at most 0.4x TTFT at 0%.

    python benchmarks/context_cache.py [--model DIR] [--prompt-len 2048] [--requests 6]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import httpx
from tqdm import tqdm

from matrixinfer.bench.client import parse_sse_line
from matrixinfer.bench.launch import ServerProcess


async def ttft(client: httpx.AsyncClient, url: str, prompt: list[int]) -> float:
    body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if isinstance(parse_sse_line(line), dict):
                return time.perf_counter() - start
    raise RuntimeError("stream ended without a token")


async def level(url: str, reuse: float, args, vocab: int, server: ServerProcess) -> dict:
    rng = random.Random(args.seed + int(reuse * 100))
    bs = args.block_size
    shared = (int(args.prompt_len * reuse) // bs) * bs
    prefix = [rng.randrange(10, vocab) for _ in range(shared)]
    mk = lambda: prefix + [rng.randrange(10, vocab) for _ in range(args.prompt_len - shared)]  # noqa: E731
    async with httpx.AsyncClient(timeout=600) as client:
        if shared:  # store the prefix in the pool, and wait until the asynchronous store lands
            stored = sum(server.instance_metrics().get("ems_stored_blocks", {}).values())
            await ttft(client, url, mk())
            deadline = time.time() + 30
            while sum(server.instance_metrics().get("ems_stored_blocks", {}).values()) < stored + shared // bs \
                    and time.time() < deadline:
                await asyncio.sleep(0.1)
        times = []
        for _ in tqdm(range(args.requests), desc=f"reuse {reuse:.0%} TTFT", unit="req"):
            times.append(await ttft(client, url, mk()))
        prompts = [mk() for _ in range(args.requests)]
        start = time.perf_counter()
        await asyncio.gather(*[ttft(client, url, p) for p in prompts])
        wall = time.perf_counter() - start
    return {"reuse": reuse, "ttft_s": statistics.mean(times), "prefill_tok_s": args.requests * args.prompt_len / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from matrixinfer.model.default_model import default_model_path

    model_dir = args.model or str(default_model_path())
    server = ServerProcess(["--model", model_dir, "--served-model-name", "bench", "--log-level", "warning",
                            "--num-prefill", "1", "--num-decode", "1", "--num-ems", "1", "--ems-capacity", "1G",
                            "--no-prefix-caching", "--kv-cache-memory", str(512 << 20),
                            "--block-size", str(args.block_size), "--max-num-batched-tokens", "4096"])
    try:
        info = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        if info["max_model_len"] <= args.prompt_len:
            raise SystemExit(f"the model's context ({info['max_model_len']}) is too short "
                             f"for --prompt-len {args.prompt_len}")
        asyncio.run(ttft(httpx.AsyncClient(), server.url, [11] * 32))  # warm-up
        rows = [asyncio.run(level(server.url, r, args, info["vocab_size"], server)) for r in (0.0, 0.5, 0.9)]
        hits = sum(server.instance_metrics().get("external_hit_tokens", {}).values())
    finally:
        server.stop()
    base = rows[0]
    print(f"\ncontext cache through EMS, prompts of {args.prompt_len} tokens, {args.requests} requests per level")
    print(f"{'reuse':>6} {'TTFT ms':>9} {'vs 0%':>7} {'prefill tok/s':>14} {'gain':>6}")
    for r in rows:
        print(f"{r['reuse']:>6.0%} {1000 * r['ttft_s']:>9.1f} {r['ttft_s'] / base['ttft_s']:>6.2f}x "
              f"{r['prefill_tok_s']:>14.0f} {r['prefill_tok_s'] / base['prefill_tok_s']:>5.2f}x")
    ratio = rows[2]["ttft_s"] / base["ttft_s"]
    print(f"tokens loaded from EMS: {hits:.0f}")
    print(f"RESULT TTFT at 90% reuse = {ratio:.2f}x the 0% TTFT (bar <= 0.4): {'PASS' if ratio <= 0.4 else 'FAIL'}")


if __name__ == "__main__":
    main()
