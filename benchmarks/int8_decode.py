"""Engine decode tokens/s, INT8 checkpoint vs the original, demo model, same run.

Quantizes the model with the default recipe (or takes ``--int8 DIR``), then runs the same
requests (``--batch`` concurrent sequences, ``--prompt-len`` prompt tokens, ``--tokens`` output
tokens each, greedy, exact lengths) on an engine over each checkpoint, alternating
original / INT8 for ``--trials`` rounds on fresh engines. The figure per run is decode throughput:
output tokens produced after every sequence has its first token, divided by the time that took
(prefill excluded). Prints the medians and the ratio INT8 / original per batch size. Runs
unchanged on CUDA (``--device cuda``), where INT8 linears use ``torch._int_mm``.

    python benchmarks/int8_decode.py [--batch 1,8,32] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from matrixinfer.model.default_model import SHIPPED


def quantize(model: str, out: str) -> None:
    from matrixinfer.model.loader import load_model
    from matrixinfer.quant import calibration
    from matrixinfer.quant.checkpoint import write_checkpoint
    from matrixinfer.quant.quantizer import Quantizer

    float_model = load_model(model, progress=False)
    report = Quantizer(float_model, calibration.windows(model, calibration.BUILTIN, 257, 32)).run()
    write_checkpoint(float_model, model, out, report.rotated, report.details())


def decode_rate(path: str, device: str, batch: int, prompt_len: int, tokens: int, seed: int) -> dict[str, float]:
    """One run on a fresh engine: decode tokens/s (after every sequence's first token)."""
    from matrixinfer.config import EngineConfig
    from matrixinfer.engine.llm_engine import LLMEngine
    from matrixinfer.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=path, device=device, kv_cache_memory=256 << 20,
                                    max_num_seqs=max(batch, 1), max_num_batched_tokens=4096))
    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    engine.generate([[rng.randrange(10, vocab) for _ in range(16)]], SamplingParams(temperature=0, max_tokens=4))
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(10, vocab) for _ in range(prompt_len)],
                           SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    started: set[str] = set()
    produced, t0 = 0, None
    while engine.has_work():
        outs = engine.step()
        if t0 is not None:
            produced += len(outs)
        started.update(o.request_id for o in outs)
        if t0 is None and len(started) == batch:
            t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    assert t0 is not None
    seconds = time.perf_counter() - t0
    return {"decode_tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHIPPED))
    ap.add_argument("--int8", default=None, help="an INT8 checkpoint of --model (default: quantize now)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        int8 = args.int8
        if int8 is None:
            int8 = str(Path(tmp) / "int8")
            print("quantizing (default recipe)...")
            quantize(args.model, int8)
        results = []
        for batch in (int(b) for b in args.batch.split(",")):
            runs: dict[str, list[float]] = {"original": [], "int8": []}
            for trial in range(args.trials):
                for name, path in (("original", args.model), ("int8", int8)):
                    r = decode_rate(path, args.device, batch, args.prompt_len, args.tokens, seed=trial)
                    runs[name].append(r["tokens_per_s"])
                    print(f"  batch {batch}, trial {trial + 1}: {name} {r['tokens_per_s']:.1f} tok/s")
            fp, q = statistics.median(runs["original"]), statistics.median(runs["int8"])
            results.append({"batch": batch, "original_tok_s": fp, "int8_tok_s": q, "int8_over_original": q / fp,
                            "runs": runs})
    print(f"\ndevice {args.device}, threads {torch.get_num_threads()}, prompts {args.prompt_len} tokens, "
          f"{args.tokens} output tokens per sequence, median of {args.trials} alternating runs")
    print(f"{'batch':>5} {'original tok/s':>15} {'INT8 tok/s':>11} {'INT8/original':>14}")
    for r in results:
        print(f"{r['batch']:>5} {r['original_tok_s']:>15.1f} {r['int8_tok_s']:>11.1f} {r['int8_over_original']:>14.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
