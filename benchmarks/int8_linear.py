"""INT8 (W8A8) linear vs float32 linear at decode sizes, same run, same process.

For every INT8-eligible matrix shape of the demo model and of DeepSeek-V2-Lite (from their
config.json: the attention projections, the dense MLP, the shared experts and one routed expert)
and 1-64 rows, times the two modules a loaded model would run on this machine: the float32
``Linear`` (its ``cpu`` backend: the native small-batch kernel) and ``Int8Linear`` (its ``cpu``
backend: the native W8A8 kernel, which quantizes the rows itself). Prints each time and the ratio
float32 / INT8 (above 1: INT8 faster), and whether INT8 is faster at every size. ``--int-mm`` adds
``torch._int_mm`` on the CPU for the shapes where it finishes in reasonable time (it is a reference
loop there, which is why the CPU path does not use it).

    python benchmarks/int8_linear.py [--rows 1,2,4,8,16,32,64] [--threads N] [--json out.json]
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


def timed(fns: list[Callable[..., object]], *args: object, min_time: float = 0.03, reps: int = 7) -> list[float]:
    """Median seconds per call of each of ``fns(*args)``, measured in alternating batches (so a
    slower phase of the machine hits every function alike)."""
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
    return [statistics.median(s) for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--int-mm", action="store_true", help="also time torch._int_mm on the CPU (small shapes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    models = {"demo": ModelConfig.from_file(SHIPPED),
              "V2-Lite": ModelConfig.from_file(MODEL_CONFIGS / "deepseek-v2-lite.config.json")}
    torch.manual_seed(0)
    results = []
    cases = [(m, n, s) for m, cfg in models.items() for n, s in linear_shapes(cfg).items()]
    with torch.no_grad():
        for model, name, (out_f, in_f) in tqdm(cases, desc="shapes", unit="shape"):
            lin = Linear(in_f, out_f, bias=False)
            torch.nn.init.normal_(lin.weight, std=in_f ** -0.5)
            q = int8_linear(lin)
            for mod in (lin, q):
                select_backend(mod, "cpu")
            assert lin.backend == "cpu" and q.backend == "cpu", "the native kernels are not available"
            for m in rows:
                x = torch.randn(m, in_f)
                t_fp, t_q = timed([lin, q], x)
                r = {"model": model, "matrix": name, "out": out_f, "in": in_f, "rows": m,
                     "fp32_us": t_fp * 1e6, "int8_us": t_q * 1e6, "fp32_over_int8": t_fp / t_q}
                if args.int_mm and m * in_f * out_f <= 64 * 256 * 512:
                    xq = torch.randint(-127, 127, (max(m, 17), in_f), dtype=torch.int8)
                    r["int_mm_us"] = timed([torch._int_mm], xq, q.weight.t(), reps=3)[0] * 1e6
                results.append(r)
    print(f"\nthreads: {torch.get_num_threads()}; float32 = Linear's cpu backend (native small-batch kernel), "
          "INT8 = Int8Linear's cpu backend (native W8A8 kernel, activation quantization included)")
    head = f"{'model':<8} {'matrix':<15} {'out x in':>12} {'rows':>4} {'fp32 us':>9} {'int8 us':>9} {'fp32/int8':>9}"
    print(head + ("  int_mm us" if args.int_mm else ""))
    for r in results:
        line = (f"{r['model']:<8} {r['matrix']:<15} {r['out']:>5} x {r['in']:<5} {r['rows']:>4} {r['fp32_us']:>9.1f} "
                f"{r['int8_us']:>9.1f} {r['fp32_over_int8']:>9.2f}")
        if "int_mm_us" in r:
            line += f"  {r['int_mm_us']:>9.1f}"
        print(line)
    worst = min(results, key=lambda r: r["fp32_over_int8"])
    for model in models:
        ratios = [r["fp32_over_int8"] for r in results if r["model"] == model]
        print(f"{model}: fp32/int8 geometric mean {statistics.geometric_mean(ratios):.2f}, "
              f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    print(f"INT8 faster at every size: {'yes' if worst['fp32_over_int8'] > 1 else 'no'} (slowest case: "
          f"{worst['model']} {worst['matrix']} x{worst['rows']} rows, ratio {worst['fp32_over_int8']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
