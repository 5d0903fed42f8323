"""INT8 (W8A8) linear vs float32 linear at decode sizes, same run, same process.

For every INT8-eligible matrix shape of the demo model and of DeepSeek-V2-Lite (from their
config.json: the attention projections, the dense MLP, the shared experts and one routed expert)
and 1-64 rows, times the two modules a loaded model would run on this machine: the float32
``Linear`` (its ``cpu`` backend: the native small-batch kernel) and ``Int8Linear`` (its ``cpu``
backend: the native W8A8 kernel, which quantizes the rows itself). Prints each time and the ratio
float32 / INT8 (above 1: INT8 faster), and whether INT8 is faster at every size.

Two cache regimes, both printed: ``cold`` (the default figure) cycles through enough copies of
each matrix that they do not fit in the last-level cache, so every call streams its weights from
memory as a decode step does (the demo model's float32 weights, 48 MB, already exceed this
machine's 32 MB L3; DeepSeek's exceed any cache); ``warm`` calls one matrix over and over, so a
small one stays in cache and the figure is the kernels' arithmetic and call overhead.
``--int-mm`` adds ``torch._int_mm`` on the CPU (warm, small shapes only: it is a reference loop
there, which is why the CPU path does not use it).

    python benchmarks/int8_linear.py [--rows 1,2,4,8,16,32,64] [--models demo,V2-Lite] [--threads N]
        [--stat median|min] [--reps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from matrixinfer.config import ModelConfig
from matrixinfer.model.backend import select_backend
from matrixinfer.model.default_model import SHIPPED
from matrixinfer.model.layers import Linear
from matrixinfer.quant.quantizer import int8_linear
from matrixinfer.sim.shapes import MODEL_CONFIGS


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``name -> (out, in)`` of the model's INT8-eligible linear shapes (one routed expert)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    shapes = {"kv_a_proj": (cfg.kv_cache_dim, h), "o_proj": (h, heads * cfg.v_head_dim)}
    if cfg.q_lora_rank is None:
        shapes["q_proj"] = (heads * cfg.qk_head_dim, h)
    else:
        shapes["q_a_proj"] = (cfg.q_lora_rank, h)
        shapes["q_b_proj"] = (heads * cfg.qk_head_dim, cfg.q_lora_rank)
    shapes["mlp.gate|up"] = (cfg.intermediate_size, h)
    shapes["mlp.down"] = (h, cfg.intermediate_size)
    if cfg.n_routed_experts:
        shared = cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)
        if shared:
            shapes["shared.gate|up"], shapes["shared.down"] = (shared, h), (h, shared)
        shapes["expert.gate_up"] = (2 * cfg.moe_intermediate_size, h)
        shapes["expert.down"] = (h, cfg.moe_intermediate_size)
    return shapes


def timed(fns: list[Callable[..., object]], *args: object, min_time: float = 0.03, reps: int = 7,
          stat: str = "median") -> list[float]:
    """Seconds per call of each of ``fns(*args)``: the median (or, with ``stat="min"``, the fastest)
    of ``reps`` batches of about ``min_time`` seconds, measured alternately (so a slower phase of the
    machine hits every function alike). On a machine shared with other jobs, those jobs only ever
    add time to a batch, so the fastest batch is the figure least disturbed by them."""
    calls = []
    for fn in fns:
        fn(*args)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            fn(*args)
            n += 1
        calls.append(max(1, n))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            for _ in range(calls[i]):
                fn(*args)
            samples[i].append((time.perf_counter() - t) / calls[i])
    pick = min if stat == "min" else statistics.median
    return [pick(s) for s in samples]


class Cycle:
    """Calls the next of ``modules`` each time (one module: always that one)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules, self.i = modules, 0

    def __call__(self, x: torch.Tensor) -> object:
        self.i = (self.i + 1) % len(self.modules)
        return self.modules[self.i](x)


def copies_for(out_f: int, in_f: int, budget: int) -> int:
    """Copies of a float32 ``[out_f, in_f]`` matrix that together exceed ``budget`` bytes."""
    return max(2, -(-budget // (out_f * in_f * 4)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--int-mm", action="store_true", help="also time torch._int_mm on the CPU (small shapes)")
    ap.add_argument("--cold-bytes", type=int, default=96 << 20,
                    help="float32 bytes of matrix copies cycled through in the cold regime (default 96 MiB)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per case, the median or the fastest of --reps alternating batches (min: on a machine "
                         "shared with other jobs)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--models", default="demo,V2-Lite", help="which models' shapes (demo, V2-Lite)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    batch_s = 0.001 if args.stat == "min" else 0.03  # many short batches: some fall between other jobs' bursts
    known = {"demo": SHIPPED, "V2-Lite": MODEL_CONFIGS / "deepseek-v2-lite.config.json"}
    wanted = args.models.split(",")
    if unknown := [m for m in wanted if m not in known]:
        ap.error(f"unknown model {unknown[0]!r}: choose from {', '.join(known)}")
    models = {m: ModelConfig.from_file(known[m]) for m in wanted}
    torch.manual_seed(0)
    results = []
    cases = [(m, n, s) for m, cfg in models.items() for n, s in linear_shapes(cfg).items()]
    with torch.no_grad():
        for model, name, (out_f, in_f) in tqdm(cases, desc="shapes", unit="shape"):
            floats, ints = [], []
            for _ in range(copies_for(out_f, in_f, args.cold_bytes)):
                lin = Linear(in_f, out_f, bias=False)
                torch.nn.init.normal_(lin.weight, std=in_f ** -0.5)
                q = int8_linear(lin)
                for mod in (lin, q):
                    select_backend(mod, "cpu")
                assert lin.backend == "cpu" and q.backend == "cpu", "the native kernels are not available"
                floats.append(lin)
                ints.append(q)
            first = torch.randn(1, in_f)
            for mod in floats + ints:  # as in a served model, every module has run before the timed calls
                mod(first)  # (Int8Linear checks its operands once, on its first call)
            for m in rows:
                x = torch.randn(m, in_f)
                how = {"min_time": batch_s, "reps": args.reps, "stat": args.stat}
                cold_fp, cold_q = timed([Cycle(floats), Cycle(ints)], x, **how)  # type: ignore[arg-type]
                warm_fp, warm_q = timed([floats[0], ints[0]], x, **how)  # type: ignore[arg-type]
                r = {"model": model, "matrix": name, "out": out_f, "in": in_f, "rows": m, "copies": len(floats),
                     "fp32_us": cold_fp * 1e6, "int8_us": cold_q * 1e6, "fp32_over_int8": cold_fp / cold_q,
                     "warm_fp32_us": warm_fp * 1e6, "warm_int8_us": warm_q * 1e6,
                     "warm_fp32_over_int8": warm_fp / warm_q}
                if args.int_mm and m * in_f * out_f <= 64 * 256 * 512:
                    xq = torch.randint(-127, 127, (max(m, 17), in_f), dtype=torch.int8)
                    r["int_mm_us"] = timed([torch._int_mm], xq, ints[0].weight.t(), reps=3)[0] * 1e6
                results.append(r)
    print(f"\nthreads: {torch.get_num_threads()}; {args.stat} of {args.reps} alternating batches; "
          "float32 = Linear's cpu backend (native small-batch kernel), "
          "INT8 = Int8Linear's cpu backend (native W8A8 kernel, activation quantization included); "
          "cold: weights streamed from memory, warm: one matrix kept in cache")
    head = (f"{'model':<8} {'matrix':<15} {'out x in':>12} {'rows':>4} {'cold fp32 us':>12} {'int8 us':>9} "
            f"{'fp32/int8':>9} {'warm fp32 us':>12} {'int8 us':>9} {'fp32/int8':>9}")
    print(head + ("  int_mm us" if args.int_mm else ""))
    for r in results:
        line = (f"{r['model']:<8} {r['matrix']:<15} {r['out']:>5} x {r['in']:<5} {r['rows']:>4} {r['fp32_us']:>12.1f} "
                f"{r['int8_us']:>9.1f} {r['fp32_over_int8']:>9.2f} {r['warm_fp32_us']:>12.1f} "
                f"{r['warm_int8_us']:>9.1f} {r['warm_fp32_over_int8']:>9.2f}")
        if "int_mm_us" in r:
            line += f"  {r['int_mm_us']:>9.1f}"
        print(line)
    for key, regime in (("fp32_over_int8", "cold"), ("warm_fp32_over_int8", "warm")):
        for model in models:
            ratios = [r[key] for r in results if r["model"] == model]
            print(f"{regime} {model}: fp32/int8 geometric mean {statistics.geometric_mean(ratios):.2f}, "
                  f"min {min(ratios):.2f}, max {max(ratios):.2f}")
        worst = min(results, key=lambda r: r[key])
        print(f"{regime}: INT8 faster at every size: {'yes' if worst[key] > 1 else 'no'} (slowest case: "
              f"{worst['model']} {worst['matrix']} x{worst['rows']} rows, ratio {worst[key]:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "stat": args.stat, "reps": args.reps,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
