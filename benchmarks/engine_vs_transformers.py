"""Output tokens/s of the MatrixInfer engine vs transformers' generate on the same requests.

64 requests (prompts 64-512 tokens, outputs 64-256 tokens, seeded), greedy, exact output lengths.
transformers runs them in its best batched way: left-padded static batches sorted by length, for
each batch size in --hf-batch-sizes, keeping the fastest; only each request's own output tokens
count. The engine figure is the median of --trials runs on fresh engines. Prints both figures
and their ratio; runs unchanged on CUDA (--device cuda).

    python benchmarks/engine_vs_transformers.py [--model DIR] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from tqdm import tqdm


def make_requests(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(64, 512))], rng.randint(64, 256))
            for _ in range(n)]


def run_engine(path, requests, device: str, dtype: torch.dtype, trials: int) -> dict:
    """``trials`` runs, each on a fresh engine (a warm prefix cache would skip prefills); the
    median run is the figure."""
    from matrixinfer.config import EngineConfig
    from matrixinfer.engine.llm_engine import LLMEngine
    from matrixinfer.engine.sampling_params import SamplingParams

    runs = []
    for trial in range(trials):
        engine = LLMEngine(EngineConfig(model=str(path), device=device, dtype=str(dtype).split(".")[1],
                                        kv_cache_memory=1 << 30, max_num_seqs=64, max_num_batched_tokens=2048))
        engine.generate([requests[0][0][:16]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        for i, (p, n) in enumerate(requests):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        total = sum(n for _, n in requests)
        done = 0
        start = time.perf_counter()
        with tqdm(total=total, desc=f"matrixinfer engine, run {trial + 1}/{trials}", unit="tok") as bar:
            while engine.has_work():
                outs = engine.step()
                bar.update(len(outs))
                done += len(outs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        runs.append({"output_tokens": done, "seconds": wall, "tokens_per_s": done / wall, "steps": engine.steps})
        print(f"  matrixinfer engine run {trial + 1}: {done / wall:.1f} tok/s ({wall:.2f} s, {engine.steps} steps)")
    median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    return dict(median, runs=[r["tokens_per_s"] for r in runs])


def run_transformers(path, requests, device: str, dtype: torch.dtype, batch_sizes: list[int]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    best = None
    for bs in batch_sizes:
        useful = 0
        start = time.perf_counter()
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        for batch in tqdm(batches, desc=f"transformers batch {bs}", unit="batch"):
            prompts = [requests[i][0] for i in batch]
            width = max(len(p) for p in prompts)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, p in enumerate(prompts):  # left padding
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            new = max(requests[i][1] for i in batch)
            with torch.no_grad():
                model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
            useful += sum(requests[i][1] for i in batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        result = {"batch_size": bs, "output_tokens": useful, "seconds": wall, "tokens_per_s": useful / wall}
        print(f"  transformers batch {bs}: {result['tokens_per_s']:.1f} tok/s")
        if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
            best = result
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-batch-sizes", default="64,32,16,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=3, help="engine runs; the median is reported")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from matrixinfer.config import ModelConfig
    from matrixinfer.model.default_model import default_model_path

    path = args.model or default_model_path()
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    requests = make_requests(args.num_requests, ModelConfig.from_file(path).vocab_size, args.seed)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads"
    print(f"model {path} on {device_name}, {len(requests)} requests, "
          f"{sum(len(p) for p, _ in requests)} prompt / {sum(n for _, n in requests)} output tokens")
    ours = run_engine(path, requests, args.device, dtype, args.trials)
    print(f"  matrixinfer engine (median of {args.trials}): {ours['tokens_per_s']:.1f} tok/s")
    hf = run_transformers(path, requests, args.device, dtype, [int(b) for b in args.hf_batch_sizes.split(",")])
    ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    print(f"\nRESULT engine {ours['tokens_per_s']:.1f} tok/s vs transformers {hf['tokens_per_s']:.1f} tok/s "
          f"(batch {hf['batch_size']}): {ratio:.1f}x on {device_name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "engine": ours, "transformers": hf, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
