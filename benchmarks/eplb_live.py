"""Live expert-load balancing in a running EP instance of the demo model, against the contiguous
placement in the same run.

Two instances of ``--ep`` rank processes (gloo, fp32 dispatch) serve the same held-out stdlib code
prompts, greedy:

- baseline: contiguous placement, no copies, no rebalance;
- balanced: ``--redundant-experts R --eplb-interval S``: the instance re-places its experts live
  while serving the first half of the prompts (warm-up), then keeps its placement.

For each, the load routed while serving the second half (the difference of two ``/ep/load``
snapshots) gives every MoE layer's busiest rank / mean under the placement then in use. It also
checks that both instances give the same greedy tokens. On 2 cores, step times mean nothing
here (four ranks share them), so only the balance is reported. About 3-5 minutes on 2 cores.

    python benchmarks/eplb_live.py [--ep 4] [--redundant 4] [--interval 8] [--prompts 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from matrixinfer.config import EngineConfig
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import SHIPPED
from matrixinfer.parallel.eplb import ReplicatedPlacement
from matrixinfer.parallel.launch import start_instance
from matrixinfer.quant.calibration import windows


def run(cfg: EngineConfig, prompts: list[list[int]],
        params: SamplingParams) -> tuple[list[list[int]], list[float], list[float]]:
    """Greedy tokens of all prompts, and each MoE layer's balance over the second half's load and
    (in sample) over the warm-up's load, under the placement in use after the warm-up."""
    inst = start_instance(cfg)
    try:
        eng = inst.engine
        half = len(prompts) // 2
        t0 = time.perf_counter()
        first = eng.generate(prompts[:half], params)
        eng.eplb_interval = 0  # the window below is measured under one placement
        before = eng.load_snapshot()
        second = eng.generate(prompts[half:], params)
        after = eng.load_snapshot()
        print(f"  --redundant-experts {cfg.redundant_experts} --eplb-interval {cfg.eplb_interval}: "
              f"{time.perf_counter() - t0:.1f} s, {after['rebalances']} live rebalance(s), "
              f"expert copies received per rank {[r['experts_received'] for r in after['ranks']]}", flush=True)
    finally:
        inst.close()
    n = len(after["expert_tokens"][0])
    balance, in_sample = [], []
    for layer, (a, b) in enumerate(zip(before["expert_tokens"], after["expert_tokens"])):
        window = [float(y - x) for x, y in zip(a, b)]
        placement = ReplicatedPlacement.from_table(after["layers"][layer]["slots"], n)
        balance.append(placement.balance(window))
        in_sample.append(placement.balance([float(x) for x in a]))
    return first + second, balance, in_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--interval", type=int, default=8, help="steps between live rebalances during the warm-up")
    ap.add_argument("--target", type=float, default=1.05)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--length", type=int, default=24, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per prompt")
    a = ap.parse_args()
    prompts = windows(SHIPPED, "builtin", a.length, a.prompts, half="evaluation").tolist()
    params = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    cfg = EngineConfig(model=str(SHIPPED), device="cpu", dtype="float32", kv_cache_memory=16 << 20, ep=a.ep)
    print(f"demo model, EP {a.ep}, {a.prompts} held-out code prompts x {a.tokens} tokens (window: the second half)")
    base_out, base, base_in = run(cfg, prompts, params)
    live_cfg = dataclasses.replace(cfg, redundant_experts=a.redundant, eplb_interval=a.interval, eplb_target=a.target)
    live_out, live, live_in = run(live_cfg, prompts, params)
    print("\nbusiest rank / mean, per MoE layer:")
    print(f"| layer | contiguous | R = {a.redundant} + live rebalance | ratio |")
    print("|---|---|---|---|")
    for i, (x, y) in enumerate(zip(base, live)):
        print(f"| {i} | {x:.3f} | {y:.3f} | {y / x:.3f} |")
    mx, my = sum(base) / len(base), sum(live) / len(live)
    print(f"| mean | {mx:.3f} | {my:.3f} | {my / mx:.3f} |")
    print("\nin sample (the warm-up's own load under the placement after it): contiguous "
          f"{', '.join(f'{x:.3f}' for x in base_in)}; balanced {', '.join(f'{x:.3f}' for x in live_in)}")
    same = sum(p == q for x, y in zip(base_out, live_out) for p, q in zip(x, y))
    print(f"\ngreedy tokens equal between the two: {same}/{a.prompts * a.tokens}")


if __name__ == "__main__":
    main()
