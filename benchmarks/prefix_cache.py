"""Mean TTFT with a warm prefix cache vs cold, same run: a 2,048-token shared prefix that is 90% of
each prompt (2,048 shared + 228 unique tokens).

Cold: each request's prefix is unique, so nothing is cached. Warm: one request stores the shared
prefix, then requests with different suffixes reuse it. Requests run one at a time so TTFT is the
prefill time alone. The bar is warm/cold <= 0.25.

    python benchmarks/prefix_cache.py [--model DIR] [--device cpu|cuda] [--requests 8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from tqdm import tqdm

PREFIX, SUFFIX = 2048, 228


def ttft(engine, rid: str, prompt: list[int]) -> float:
    from matrixinfer.engine.sampling_params import SamplingParams

    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while True:
        outs = engine.step()
        if any(o.request_id == rid for o in outs):
            return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from matrixinfer.config import EngineConfig
    from matrixinfer.engine.llm_engine import LLMEngine
    from matrixinfer.model.default_model import default_model_path

    path = args.model or default_model_path()
    engine = LLMEngine(EngineConfig(model=str(path), device=args.device, kv_cache_memory=1 << 30,
                                    max_num_batched_tokens=4096, max_model_len=PREFIX + SUFFIX + 64))
    if engine.max_model_len < PREFIX + SUFFIX + 1:
        raise SystemExit(f"{path}: context of {engine.max_model_len} tokens is too short for this benchmark")
    vocab = engine.model.config.vocab_size
    rng = random.Random(args.seed)
    rand = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    ttft(engine, "warmup", rand(64))
    cold = [ttft(engine, f"cold{i}", rand(PREFIX + SUFFIX)) for i in tqdm(range(args.requests), desc="cold")]
    shared = rand(PREFIX)
    ttft(engine, "store", shared + rand(SUFFIX))
    hits0 = engine.blocks.hit_tokens
    warm = [ttft(engine, f"warm{i}", shared + rand(SUFFIX)) for i in tqdm(range(args.requests), desc="warm")]
    hit_per_req = (engine.blocks.hit_tokens - hits0) / args.requests
    c, w = statistics.mean(cold), statistics.mean(warm)
    print(f"prompt {PREFIX + SUFFIX} tokens ({PREFIX} shared), {args.requests} requests each, device {args.device}")
    print(f"cold TTFT mean {c * 1000:.1f} ms, warm TTFT mean {w * 1000:.1f} ms, "
          f"{hit_per_req:.0f} cached tokens/request")
    print(f"RESULT warm/cold = {w / c:.3f} (bar <= 0.25)")


if __name__ == "__main__":
    main()
