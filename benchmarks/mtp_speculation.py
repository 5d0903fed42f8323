"""Decode speed with MTP speculative decoding against the same engine without it (issue 15's bar).

For each batch size (default 1 and 64), B greedy requests run on a plain engine and on an engine
with ``--speculative mtp`` (its policy deciding each step from the step costs it measured at
start-up and learns while serving), alternating, ``--trials`` times each, each trial taking the
next of the engines' orders (all of them in turn). Below batch 16 each engine runs its whole
batch in turn; from batch 16 on the engines take turns of 100 ms within a trial (``--turn-ms``
sets one turn length for all):

- At batch 1 every engine decodes the same prompt into the same tokens, so in short turns one
  engine's steps leave the experts the other's next steps route to in the cache: in 100 ms turns
  the plain engine ran at 653-826 tok/s against 410-513 in whole trials (the speculative engine's
  ~690 either way), a bias of the method, not a property of either engine.
- At batch 64 the routing covers every expert each step, and the error is the machine's drift
  between trials seconds apart. Two identical plain engines (an A/A run, 5 trials): medians of the
  per-trial ratio 0.934, 1.010, 0.964 in whole trials (single trials 0.87-1.28), against 0.995,
  1.000, 1.002 in 100 ms turns (single trials 0.98-1.015).

Before the trials each engine serves a warm-up batch at each batch size
(``--warmup-len`` tokens): first-call allocations, and the policy's first steps at that batch.
Then the speculating engine serves more warm-up batches until its policy has settled at each batch
size (``SpecPolicy.settled``, at most ``--settle-max`` batches): until every depth it does not
choose has had its first exploring turns, those come sooner (about 10% of the first ~1,000 steps
at batch 1, against 0.25% of throughput per depth afterwards), and the trials measure a serving
engine's steady state, not its first seconds.
Prompts are windows of the CPython stdlib files the demo model held out of training (the model
completes Python code), outputs a fixed length (``ignore_eos``). The decode figure counts the
tokens produced after every request has its first token, over the time of the engine's steps from
then on (prefill excluded; wall time, and the process's CPU time, which other processes on the
cores inflate less). Prints both figures per batch size (medians over trials), their same-run ratio
(the median over trials of each trial's ratio: trials are seconds apart and the machine's state
drifts between them), the acceptance rate, tokens per speculative step and the share of decode
steps that speculated; with ``--always`` also an engine that speculates at every batch size (no policy), to
show what the policy avoids; and the step costs the policy learned against its start-up figures.

Bar (demo model, CPU): batch 1 >= 1.3x, batch 64 >= 0.98x. The default K is 2: the policy picks 0,
1 or 2 drafts per step from the measured costs and acceptance (at batch 1 on the demo model it
settles on 2: the second draft is accepted ~0.9 of the times the first is); ``-k 1`` for one.

    python benchmarks/mtp_speculation.py [--model DIR] [--device cpu|cuda] [-k 2] [--batch-sizes 1,64]
        [--trials 5] [--output-len 128] [--warmup-len 128] [--turn-ms MS] [--always] [--threads N]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time

import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.llm_engine import LLMEngine
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.model.default_model import default_model_path
from matrixinfer.model.loader import load_model
from matrixinfer.model.tokenizer import Tokenizer
from matrixinfer.train.corpus import EXCLUDED_DIRS, is_heldout, stdlib_root
from matrixinfer.train.recipe import TrainConfig

BARS = {1: 1.3, 64: 0.98}
TURNS_FROM_BATCH = 16  # the engines take 100 ms turns within a trial from this batch size on (see above)


def heldout_prompts(tok: Tokenizer, n: int, seed: int) -> list[list[int]]:
    """``n`` windows of 96-160 tokens from the held-out stdlib files (the demo model never saw them)."""
    root = stdlib_root()
    pct = TrainConfig().heldout_percent
    texts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if is_heldout(rel, pct) and not EXCLUDED_DIRS.intersection(rel.split("/")[:-1]):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    ids = tok.encode("\n".join(texts), add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(96, 160)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start:start + length])
    return out


def decode_trial(engines: dict[str, LLMEngine], prompts: list[list[int]], output_len: int,
                 turn: float) -> dict[str, dict]:
    """One batch to completion on every engine, the engines taking turns of ``turn`` seconds (inf:
    each its whole batch, one after the other); per engine the decode tokens/s: the tokens produced
    after every request has its first token, over the time of its steps from then on (wall, and
    CPU of the process), and the engine's speculation counters.

    Turns trade one bias for another: where other processes share the cores, load swings 2-3x
    within seconds, and short turns share the swings out; but the demo model's weights fill most of
    a 32 MiB L3, and each turn starts on what the other engine left there (at batch 1, where the
    engines decode the same tokens, the experts the next steps of the other will route to).
    Measured at batch 1 (loaded, one thread), always speculating against plain: 1.15x in one-step
    turns, 1.26x in 50 ms turns, 1.40x in whole trials."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    cuda = any(e.runner.device.type == "cuda" for e in engines.values())
    state: dict[str, dict] = {}
    for name, e in engines.items():
        for i, p in enumerate(prompts):
            e.add_request(f"{name}-{time.monotonic_ns()}-{i}", p, params)
        state[name] = {"before": e.stats(), "started": set(), "decoding": False, "decode_tokens": 0,
                       "seconds": 0.0, "cpu_seconds": 0.0, "decode_steps": 0}
    live = list(engines)
    while live:
        for name in list(live):
            e, st = engines[name], state[name]
            turn_end = time.perf_counter() + turn
            while e.has_work():
                w0, c0 = time.perf_counter(), time.process_time()
                outs = e.step()
                if cuda:
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                if st["decoding"]:
                    st["decode_tokens"] += sum(len(o.token_ids) for o in outs)
                    st["seconds"] += wall
                    st["cpu_seconds"] += cpu
                    st["decode_steps"] += 1
                else:
                    st["started"].update(o.request_id for o in outs)
                    st["decoding"] = len(st["started"]) == len(prompts)
                if time.perf_counter() >= turn_end:
                    break
            if not e.has_work():
                live.remove(name)
    out = {}
    for name, e in engines.items():
        st, after = state[name], e.stats()
        d = {f: getattr(after, f) - getattr(st["before"], f) for f in
             ("spec_steps", "spec_verifications", "spec_draft_tokens", "spec_accepted_tokens")}
        out[name] = {"tokens_per_s": st["decode_tokens"] / st["seconds"] if st["seconds"] > 0 else 0.0,
                     "tokens_per_cpu_s": st["decode_tokens"] / st["cpu_seconds"] if st["cpu_seconds"] > 0 else 0.0,
                     **{k: st[k] for k in ("decode_tokens", "seconds", "cpu_seconds", "decode_steps")}, **d}
    return out


def paired(runs: dict[str, list[dict]], name: str, key: str = "tokens_per_s") -> float:
    """The median over trials of each trial's ratio of engine ``name`` to the plain engine in the same
    trial (runs seconds apart: the machine's drift between trials cancels)."""
    return statistics.median(r[key] / p[key] for r, p in zip(runs[name], runs["plain"]))


def _startup(costs, batch: int) -> list[float]:
    plain, spec = costs.at(batch)
    return [plain, *spec]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=2,
                    help="drafts per step at most (the policy chooses 0..K each step)")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--turn-ms", type=float, default=None,
                    help="engines take turns of this many ms within a trial (0: one step each; default: a whole "
                         "trial each below batch 16, 100 ms turns from 16). Shorter turns share out load swings, "
                         "but each turn starts on caches the "
                         "other engine filled")
    ap.add_argument("--warmup-len", type=int, default=128, help="tokens per request of the warm-up at each batch size")
    ap.add_argument("--settle-max", type=int, default=100,
                    help="warm-up batches at most, per batch size, for the policy to settle (0: measure from the first "
                         "turns, when exploration runs ~10%% of the steps at a depth not chosen)")
    ap.add_argument("--always", action="store_true", help="also run an engine that speculates at every batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads (default: torch's); 1 on a machine other processes share")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(default_model_path())
    dev = torch.device(args.device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    model = load_model(path, dtype=dtype, device=dev)
    tok = Tokenizer(path)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    top = max(batches)
    base = dict(model=path, device=args.device, dtype=str(dtype).split(".")[1], kv_cache_memory=512 << 20,
                max_num_seqs=max(top, 1), max_num_batched_tokens=max(top * 160, 1024), enable_prefix_caching=False)
    k = args.num_speculative_tokens
    engines = {"plain": LLMEngine(EngineConfig(**base), model=model, tokenizer=tok),
               "spec": LLMEngine(EngineConfig(**base, speculative="mtp", num_speculative_tokens=k),
                                 model=model, tokenizer=tok)}
    if args.always:
        engines["always"] = LLMEngine(EngineConfig(**base, speculative="mtp", num_speculative_tokens=k,
                                                   speculative_max_batch=1 << 20), model=model, tokenizer=tok)
    spec = engines["spec"].spec
    assert spec is not None and spec.policy.costs is not None
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {path}, device {device_name}, K={k}")
    costs = spec.policy.costs
    print("measured step costs, ms (batch: plain / with 1..K drafts): " + ", ".join(
        f"{b}: {costs.plain[i] * 1e3:.2f} / " + " ".join(f"{s[i] * 1e3:.2f}" for s in costs.spec)
        for i, b in enumerate(costs.batches)))
    warm = SamplingParams(temperature=0, max_tokens=args.warmup_len, ignore_eos=True)
    for e in engines.values():  # warm-up: first-call allocations and kernel builds
        for b in batches:
            e.generate(heldout_prompts(tok, b, 99 + b), warm)
    for b in batches:  # then the policy's settling turns at each batch size (see SpecPolicy.settled)
        steps0, t0, rounds = engines["spec"].stats().steps, time.perf_counter(), 0
        pool = heldout_prompts(tok, 16 * b, 1000 + b)
        while not spec.policy.settled(b) and rounds < args.settle_max:
            engines["spec"].generate([pool[(rounds * b + i) % len(pool)] for i in range(b)], warm)
            rounds += 1
        if rounds:
            print(f"batch {b}: the policy settled after {engines['spec'].stats().steps - steps0} more "
                  f"warm-up decode steps ({time.perf_counter() - t0:.1f} s)"
                  + ("" if spec.policy.settled(b) else f"; not settled after {rounds} batches"))

    results = {"model": path, "device": device_name, "k": k, "batches": {}}
    failed = False
    for b in batches:
        prompts = heldout_prompts(tok, b, args.seed + b)
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        names = list(engines)
        turn = (float("inf") if b < TURNS_FROM_BATCH else 0.1) if args.turn_ms is None else args.turn_ms / 1e3
        orders = list(itertools.permutations(names))
        for t in range(args.trials):  # each trial takes the next order of the engines
            # (rotating them put the always-speculating engine right after the policy's, on caches holding the
            # same weights, in 4 of 5 trials: the policy measured 8-11% below it, and as fast in one process
            # taking turns per request)
            order = list(orders[t % len(orders)])
            for name, r in decode_trial({n: engines[n] for n in order}, prompts, args.output_len, turn).items():
                runs[name].append(r)
        med = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
        s = runs["spec"]
        drafted = sum(r["spec_draft_tokens"] for r in s)
        accepted = sum(r["spec_accepted_tokens"] for r in s)
        verif = sum(r["spec_verifications"] for r in s)
        share = sum(r["spec_steps"] for r in s) / max(sum(r["decode_steps"] for r in s), 1)
        ratio = paired(runs, "spec")
        cpu_ratio = paired(runs, "spec", "tokens_per_cpu_s")
        row = {"plain_tokens_per_s": med["plain"], "spec_tokens_per_s": med["spec"], "ratio": ratio,
               "cpu_ratio": cpu_ratio,
               "acceptance_rate": accepted / drafted if drafted else None,
               "tokens_per_spec_step": (accepted + verif) / verif if verif else None,
               "speculated_step_share": share, "runs": runs}
        line = (f"batch {b:>3}: plain {med['plain']:8.1f} tok/s  speculative {med['spec']:8.1f} tok/s  "
                f"ratio {ratio:.3f} (per CPU second {cpu_ratio:.3f})  speculated {share:.0%} of decode steps")
        if drafted:
            line += f"  acceptance {accepted / drafted:.3f}  tokens/step {(accepted + verif) / verif:.2f}"
        if "always" in med:
            a = runs["always"]
            a_drafted = sum(r["spec_draft_tokens"] for r in a)
            a_verif = sum(r["spec_verifications"] for r in a)
            a_accepted = sum(r["spec_accepted_tokens"] for r in a)
            row["always_ratio"] = paired(runs, "always")
            row["always_cpu_ratio"] = paired(runs, "always", "tokens_per_cpu_s")
            line += f"  (always speculating: {row['always_ratio']:.3f}, per CPU second {row['always_cpu_ratio']:.3f}"
            if a_drafted:
                row["always_acceptance_rate"] = a_accepted / a_drafted
                row["always_tokens_per_spec_step"] = (a_accepted + a_verif) / a_verif
                line += f", acceptance {a_accepted / a_drafted:.3f}, tokens/step {(a_accepted + a_verif) / a_verif:.2f}"
            line += ")"
        print(line)
        if b in BARS and dev.type == "cpu":
            ok = ratio >= BARS[b]
            failed |= not ok
            print(f"  bar at batch {b}: >= {BARS[b]}x: {'PASS' if ok else 'FAIL'} "
                  f"(per CPU second, robust where other processes share the cores: "
                  f"{'PASS' if cpu_ratio >= BARS[b] else 'FAIL'})")
        results["batches"][b] = row
    learned = spec.policy.learned
    assert learned is not None
    for b in batches:
        t = learned.at(b)
        if t is not None:
            print(f"step costs learned while serving at batch {b}, ms (plain / with 1..K drafts; steps measured): "
                  + " / ".join(f"{x * 1e3:.2f} ({learned.measured(b, d)})" for d, x in enumerate(t))
                  + "; start-up measurement: " + " / ".join(f"{x * 1e3:.2f}" for x in _startup(costs, b)))
        else:
            print(f"batch {b}: past the start-up measurement's last batch ({costs.batches[-1]}), where no draft "
                  f"could pay: the policy is not asked")
    print(f"policy at the measured acceptance ({', '.join(f'{a:.3f}' for a in spec.tracker.rates())} per draft "
          f"depth): drafts per step at batch 1, 2, 4, ...: "
          f"{[spec.policy.choose(b) for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= top * 2]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
