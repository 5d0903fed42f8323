"""Decode cost of structured output (issue 18): the same engine and requests with and without a
grammar, alternating, ``--trials`` times each.

B greedy requests on the demo model decode ``--output-len`` tokens each. The constrained run uses
the regex ``[a-z ]{N}`` with N far beyond what ``--output-len`` tokens can spell, so every request
runs the full length (no request ends early and the batch stays B wide); the plain run uses
``ignore_eos``. So both runs do the same number of decode steps at the same batch size, and the
difference is the grammar's work: a matcher advance and a token mask per request per step, and the
masked copy of the logits. Prints tokens per second of each (median over trials) and their same-run
ratio, and with ``--top-logprobs K`` also the cost of returning K alternatives per token.

    python benchmarks/structured_output.py [--batch 8] [--output-len 64] [--trials 3] [--top-logprobs 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams, StructuredOutput
from matrixinfer.model.default_model import default_model_path


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - t0, sum(len(o) for o in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--top-logprobs", type=int, default=0, help="also time K alternatives per token (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", kv_cache_memory=256 << 20))
    tok = engine.tokenizer
    prompts = [tok.encode(f"# example {i}: a comment in plain words\n# ") for i in range(args.batch)]
    n = args.output_len
    variants = {
        "plain": SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
        "regex": SamplingParams(temperature=0, max_tokens=n,
                                structured=StructuredOutput(kind="regex", spec=f"[a-z ]{{{n * 40}}}")),
    }
    if args.top_logprobs:
        variants["top_logprobs"] = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=True,
                                                  top_logprobs=args.top_logprobs)
    run(engine, prompts[:1], variants["plain"])  # warm-up (kernels, allocator)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.trials):
        for name, params in variants.items():
            seconds, tokens = run(engine, prompts, params)
            assert tokens == n * args.batch, (name, tokens)
            rates[name].append(tokens / seconds)
    base = statistics.median(rates["plain"])
    print(f"demo model, batch {args.batch}, {n} tokens each, {args.trials} trials, {torch.get_num_threads()} threads")
    for name, r in rates.items():
        med = statistics.median(r)
        trials = ", ".join(f"{x:.1f}" for x in r)
        print(f"{name:>13}: {med:8.1f} tokens/s (trials {trials})  ratio to plain {med / base:.3f}")


if __name__ == "__main__":
    main()
