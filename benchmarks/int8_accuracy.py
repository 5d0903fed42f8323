"""Demo model, INT8 vs original, same run: held-out perplexity, greedy token agreement, and the
ablation table (perplexity with each quantization step removed in turn).

Calibration uses the first half of the demo corpus's held-out stdlib files, evaluation the second
half (matrixinfer.quant.calibration), so nothing is judged on the text it was calibrated on. The
default recipe is written as an INT8 checkpoint and loaded back through the loader, as
``matrixinfer serve --model OUT`` would; the ablation rows quantize in memory (the same arithmetic:
tests/quant show the round trip is exact).

Greedy agreement over ``--prompts`` prompts x ``--tokens`` tokens, two ways:
- teacher-forced: along the original model's greedy continuation, the share of positions where
  the INT8 model's greedy choice is the same token (each position judged on its own);
- free-running: both models generate on their own; the share of positions holding the same token
  (one early divergence makes every later position count as a miss).

    python benchmarks/int8_accuracy.py [--model DIR] [--no-ablation] [--kv-cache] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.backend import select_backend
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.default_model import SHIPPED
from matrixinfer.model.generate import generate
from matrixinfer.model.loader import load_model
from matrixinfer.quant import calibration
from matrixinfer.quant.checkpoint import write_checkpoint
from matrixinfer.quant.policy import QuantRecipe
from matrixinfer.quant.quantizer import Quantizer

DEFAULT = QuantRecipe()
ABLATION = [
    ("all five steps (default)", DEFAULT),
    ("- mixed precision (heads and flagged modules INT8 too)", QuantRecipe(mixed_precision=False)),
    ("- smoothing search", QuantRecipe(smooth=False)),
    ("+ Hadamard rotation of dense down_proj inputs", QuantRecipe(rotate=True)),
    ("- clipping search", QuantRecipe(clip=False)),
    ("- error compensation", QuantRecipe(bias_correction=False)),
    ("none: plain per-token x per-channel W8A8", QuantRecipe(mixed_precision=False, smooth=False, clip=False,
                                                             bias_correction=False)),
]


@torch.no_grad()
def teacher_forced(model: DeepseekForCausalLM, prompts: list[list[int]], conts: list[list[int]],
                   kv_cache_dtype: str | None = None) -> float:
    """Share of continuation positions where ``model``'s greedy choice equals ``conts`` (attending
    through a paged cache of ``kv_cache_dtype`` when given)."""
    seqs = [p + c for p, c in zip(prompts, conts)]
    lens = [len(s) - 1 for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s[:-1]])
    pos = torch.cat([torch.arange(n) for n in lens])
    if kv_cache_dtype is None:
        hidden = model(ids, pos, AttentionMetadata.build(lens))
    else:
        assert len(set(lens)) == 1, "equal lengths through a cache"
        cache, meta = calibration.paged_cache(model, kv_cache_dtype, len(lens), lens[0])
        hidden = model(ids, pos, meta, cache)
    pred = model.compute_logits(hidden).argmax(-1).split(lens)
    hits = total = 0
    for p, c, row in zip(prompts, conts, pred):
        got = row[len(p) - 1:].tolist()
        hits += sum(a == b for a, b in zip(got, c))
        total += len(c)
    return hits / total


@torch.no_grad()
def inject_outliers(model: DeepseekForCausalLM, channels: int, scale: float, seed: int = 0) -> None:
    """Give every block's normalised inputs ``channels`` outlier channels ``scale`` times larger, the
    way trained LLMs have a few huge activation channels, without changing the float model: the
    norms' weights are multiplied and every consumer's input columns divided (router included).
    The demo model, trained briefly, has no such channels, so on it every step buys little."""
    from matrixinfer.model.layers import MLP
    from matrixinfer.model.moe import MoE

    g = torch.Generator().manual_seed(seed)
    for block in model.model.layers:
        hidden = block.input_layernorm.weight.shape[0]
        for norm, consumers in (
            (block.input_layernorm, [m.weight for m in (getattr(block.self_attn, "q_proj", None),
                                                         getattr(block.self_attn, "q_a_proj", None),
                                                         block.self_attn.kv_a_proj_with_mqa) if m is not None]),
            (block.post_attention_layernorm, _mlp_inputs(block.mlp, MLP, MoE)),
        ):
            c = torch.randperm(hidden, generator=g)[:channels]
            norm.weight[c] *= scale
            for w in consumers:
                w[..., c] /= scale


def _mlp_inputs(mlp, mlp_cls, moe_cls) -> list[torch.Tensor]:
    if isinstance(mlp, mlp_cls):
        return [mlp.gate_proj.weight, mlp.up_proj.weight]
    assert isinstance(mlp, moe_cls)
    out = [mlp.gate.weight, mlp.experts.gate_up_proj]
    if mlp.shared_experts is not None:
        out += [mlp.shared_experts.gate_proj.weight, mlp.shared_experts.up_proj.weight]
    return out


def free_running(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def evaluate(model: DeepseekForCausalLM, eval_windows: torch.Tensor, prompts: list[list[int]],
             reference: list[list[int]], tokens: int, kv_cache_dtype: str | None = None) -> dict[str, float]:
    ppl = calibration.perplexity(model, eval_windows, kv_cache_dtype)
    own = generate(model, prompts, tokens, kv_cache_dtype=kv_cache_dtype or "auto")
    return {"perplexity": ppl, "teacher_forced_agreement": teacher_forced(model, prompts, reference, kv_cache_dtype),
            "free_running_agreement": free_running(own, reference)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHIPPED))
    ap.add_argument("--windows", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-ablation", action="store_true", help="only the default recipe")
    ap.add_argument("--recipes", default=None,
                    help="comma-separated indices of the ablation rows to run (0: default; all by default)")
    ap.add_argument("--outlier-channels", type=int, default=0,
                    help="first give the model this many outlier channels per norm (an exact float transform)")
    ap.add_argument("--outlier-scale", type=float, default=30.0)
    ap.add_argument("--kv-cache", action="store_true", help="also the INT8 KV cache (--kv-cache-dtype int8) rows")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calib = calibration.windows(args.model, calibration.BUILTIN, args.seq_len + 1, args.windows, "calibration")
    evalw = calibration.windows(args.model, calibration.BUILTIN, args.seq_len + 1, args.eval_windows, "evaluation")
    prompts = calibration.windows(args.model, calibration.BUILTIN, args.prompt_len, args.prompts, "evaluation").tolist()
    def load() -> DeepseekForCausalLM:
        model = load_model(args.model, progress=False)
        if args.outlier_channels:
            inject_outliers(model, args.outlier_channels, args.outlier_scale)
        return model

    original = load()
    reference = generate(original, prompts, args.tokens)
    base = evaluate(original, evalw, prompts, reference, args.tokens)
    print(f"original: held-out perplexity {base['perplexity']:.4f} ({evalw.shape[0]} x {args.seq_len} tokens; "
          f"calibration {calib.shape[0]} x {args.seq_len} tokens from the other half)")
    # The noise floor of the agreement figures: the same float model on the PyTorch path instead of
    # the native kernels (only the summation order differs).
    select_backend(original, "native")
    floor = evaluate(original, evalw, prompts, reference, args.tokens)
    print(f"original on the PyTorch path: teacher-forced agreement {100 * floor['teacher_forced_agreement']:.2f}%, "
          f"free-running {100 * floor['free_running_agreement']:.2f}%")
    rows = []
    if args.kv_cache:  # the optional INT8 latent cache, alone (float weights) and with the default recipe
        r = {"recipe": "original weights + INT8 KV cache", **evaluate(original, evalw, prompts, reference,
                                                                      args.tokens, "int8")}
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        rows.append(r)
    chosen = ABLATION[:1] if args.no_ablation else ABLATION
    if args.recipes:
        chosen = [ABLATION[int(i)] for i in args.recipes.split(",")]
    for name, recipe in chosen:
        model = load()
        start = time.perf_counter()
        report = Quantizer(model, calib, recipe).run()
        seconds = time.perf_counter() - start
        if recipe == DEFAULT:
            print(report.table())
            with tempfile.TemporaryDirectory() as tmp:  # the served path: checkpoint -> loader
                write_checkpoint(model, args.model, tmp, report.rotated, report.details())
                model = load_model(tmp, progress=False)
        r = {"recipe": name, "steps": recipe.steps(), "quantize_seconds": seconds,
             "high_precision": report.high_precision, **evaluate(model, evalw, prompts, reference, args.tokens)}
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        rows.append(r)
        if recipe == DEFAULT and args.kv_cache:
            kv = {"recipe": "all five steps + INT8 KV cache", **evaluate(model, evalw, prompts, reference,
                                                                         args.tokens, "int8")}
            kv["perplexity_change"] = kv["perplexity"] / base["perplexity"] - 1
            rows.append(kv)
        print(f"{name}: perplexity {r['perplexity']:.4f} ({100 * r['perplexity_change']:+.3f}%), teacher-forced "
              f"agreement {100 * r['teacher_forced_agreement']:.2f}%, "
              f"free-running {100 * r['free_running_agreement']:.2f}%")
    print("\n| recipe | held-out perplexity | vs original | teacher-forced agreement | free-running agreement |")
    print("|---|---|---|---|---|")
    print(f"| original (bf16 weights, float32 compute) | {base['perplexity']:.4f} | - | - | - |")
    print(f"| original, PyTorch path instead of native kernels (noise floor) | {floor['perplexity']:.4f} | "
          f"{100 * (floor['perplexity'] / base['perplexity'] - 1):+.3f}% | "
          f"{100 * floor['teacher_forced_agreement']:.2f}% | {100 * floor['free_running_agreement']:.2f}% |")
    for r in rows:
        print(f"| {r['recipe']} | {r['perplexity']:.4f} | {100 * r['perplexity_change']:+.3f}% | "
              f"{100 * r['teacher_forced_agreement']:.2f}% | {100 * r['free_running_agreement']:.2f}% |")
    d = next((r for r in rows if r["recipe"] == ABLATION[0][0]), None)
    if d is not None:
        _print_bar(d, args.prompts, args.tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"original": base, "noise_floor": floor, "rows": rows, "args": vars(args)}, f, indent=1,
                      default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))


def _print_bar(d: dict, prompts: int, tokens: int) -> None:
    print(f"\nbar: perplexity within +1%: {'yes' if d['perplexity_change'] <= 0.01 else 'no'} "
          f"({100 * d['perplexity_change']:+.3f}%); greedy agreement >= 98% over {prompts} prompts x "
          f"{tokens} tokens: teacher-forced {'yes' if d['teacher_forced_agreement'] >= 0.98 else 'no'} "
          f"({100 * d['teacher_forced_agreement']:.2f}%), free-running "
          f"{'yes' if d['free_running_agreement'] >= 0.98 else 'no'} ({100 * d['free_running_agreement']:.2f}%)")


if __name__ == "__main__":
    main()
