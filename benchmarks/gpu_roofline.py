"""MatrixInfer on a GPU against the memory roofline and transformers, in one run (issue 16).

Builds a DeepSeek-V2-Lite-shaped checkpoint of random weights cut to --layers layers (default 6:
about 3.4B parameters), then measures on the same device:

- the copy bandwidth (a large device-to-device copy: bytes read + written per second);
- engine decode at each --batches size (prompts of --prompt-len random tokens, --output-len
  greedy tokens each): tokens/s over the steps after every sequence has its first token;
- engine prefill of --prefill-batch prompts (one output token each): prompt tokens/s;
- transformers on the same checkpoint: ``generate`` at each batch (decode tokens/s after its
  prefill, timed separately) and one forward of the prefill batch.

The roofline of a decode step at batch B is the bytes it must read over the measured bandwidth:
every weight a step touches (all but the routed experts, plus the experts B tokens are expected
to pick when routing is uniform: E (1 - (1 - k/E)^B) per layer) and the latent KV of every
sequence at the mean context. Each figure prints as a fraction of its roofline and as a ratio
to transformers.

    python benchmarks/gpu_roofline.py [--layers 6] [--batches 1,16,64] [--json out.json]
    python benchmarks/gpu_roofline.py --tiny --device cpu   # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# DeepSeek-V2-Lite's published dimensions (config.json of deepseek-ai/DeepSeek-V2-Lite).
V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
    norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=163840,
    rope_theta=10000, rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)
# The same architecture at test size, to check the script end to end on a CPU (--tiny).
TINY = dict(V2_LITE, vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, rope_scaling=None,
            max_position_embeddings=4096)


def build_checkpoint(out: Path, dims: dict, layers: int, device: str) -> Path:
    """A random-weight checkpoint (bfloat16) written by transformers itself; reused when present."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from matrixinfer.model.default_model import write_byte_tokenizer

    if (out / "config.json").exists():
        return out
    cfg = DeepseekV2Config(**dict(dims, num_hidden_layers=layers))
    print(f"building a {layers}-layer random checkpoint in {out} ...", flush=True)
    with torch.device(device):
        model = DeepseekV2ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(out)
    write_byte_tokenizer(out)  # the engine needs a tokenizer; prompts here are token ids
    del model
    return out


def copy_bandwidth(device: str, gib: float = 1.0, reps: int = 10) -> float:
    """Bytes per second of a device copy (read + write)."""
    n = int(gib * (1 << 30)) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_bytes(cfg: dict, layers: int, batch: int, context: float, elt: int) -> float:
    """Bytes one decode step at ``batch`` reads: the weights it touches and the latent KV."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, rank = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    attn = h * heads * (nope + rope) + h * (rank + rope) + rank * heads * (nope + v) + heads * v * h
    dense = 3 * h * cfg["intermediate_size"]
    expert = 3 * h * cfg["moe_intermediate_size"]
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    touched = e * (1 - (1 - k / e) ** batch)
    moe = cfg["n_shared_experts"] * expert + touched * expert + h * e
    dense_layers = min(layers, cfg["first_k_dense_replace"])
    weights = layers * attn + dense_layers * dense + (layers - dense_layers) * moe + h * cfg["vocab_size"] \
        + batch * h  # the LM head, and the embedding rows looked up
    kv = batch * context * layers * (rank + rope)
    return (weights + kv) * elt


def engine_runs(path: Path, device: str, batches: list[int], prompt_len: int, output_len: int,
                prefill_batch: int, vocab: int) -> dict:
    from matrixinfer.config import EngineConfig
    from matrixinfer.engine.llm_engine import LLMEngine
    from matrixinfer.engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    engine = LLMEngine(EngineConfig(model=str(path), device=device, dtype="bfloat16", max_num_seqs=max(batches +
                                    [prefill_batch]), max_num_batched_tokens=max(8192, prompt_len * 4)))
    engine.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    out: dict = {"decode": {}}
    for b in batches:
        for i in range(b):
            prompt = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
            engine.add_request(f"d{b}-{i}", prompt, SamplingParams(temperature=0, max_tokens=output_len,
                                                                   ignore_eos=True))
        done, first_all, steps = 0, None, 0
        while engine.has_work():
            done += len(engine.step())
            steps += 1
            if first_all is None and done >= b:
                sync(device)
                first_all, done_at_first = time.perf_counter(), done
        sync(device)
        assert first_all is not None
        secs = time.perf_counter() - first_all
        tokens = done - done_at_first
        out["decode"][b] = {"tokens_per_s": tokens / secs, "tpot_ms": 1000 * secs / max(1, output_len - 1)}
        print(f"  engine decode batch {b}: {tokens / secs:,.1f} tok/s", flush=True)
    for i in range(prefill_batch):
        prompt = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"p{i}", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    sync(device)
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    sync(device)
    out["prefill_tokens_per_s"] = prefill_batch * prompt_len / (time.perf_counter() - start)
    print(f"  engine prefill {prefill_batch} x {prompt_len}: {out['prefill_tokens_per_s']:,.0f} tok/s", flush=True)
    del engine
    return out


def transformers_runs(path: Path, device: str, batches: list[int], prompt_len: int, output_len: int,
                      prefill_batch: int, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    out: dict = {"decode": {}}
    with torch.no_grad():
        for b in batches:
            ids = torch.randint(10, vocab, (b, prompt_len), generator=g).to(device)
            model(ids[:, :16])  # warm-up
            sync(device)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            sync(device)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            sync(device)
            secs = max(1e-9, time.perf_counter() - start - prefill)
            out["decode"][b] = {"tokens_per_s": b * (output_len - 1) / secs}
            print(f"  transformers decode batch {b}: {out['decode'][b]['tokens_per_s']:,.1f} tok/s", flush=True)
        ids = torch.randint(10, vocab, (prefill_batch, prompt_len), generator=g).to(device)
        sync(device)
        start = time.perf_counter()
        model(ids, use_cache=False)
        sync(device)
        out["prefill_tokens_per_s"] = prefill_batch * prompt_len / (time.perf_counter() - start)
    print(f"  transformers forward {prefill_batch} x {prompt_len}: {out['prefill_tokens_per_s']:,.0f} tok/s")
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefill-batch", type=int, default=64)
    ap.add_argument("--checkpoint", default=None, help="where to build (or find) the checkpoint")
    ap.add_argument("--tiny", action="store_true", help="test-sized dimensions: checks the script, not the GPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dims = TINY if args.tiny else V2_LITE
    batches = [int(b) for b in args.batches.split(",")]
    ckpt = Path(args.checkpoint or f"/tmp/matrixinfer-roofline-{'tiny' if args.tiny else 'v2lite'}-{args.layers}l")
    path = build_checkpoint(ckpt, dims, args.layers, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    bw = copy_bandwidth(args.device, gib=1.0 if args.device.startswith("cuda") else 0.25)
    print(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    run = dict(path=path, device=args.device, batches=batches, prompt_len=args.prompt_len,
               output_len=args.output_len, prefill_batch=args.prefill_batch, vocab=dims["vocab_size"])
    ours = engine_runs(**run)
    hf = transformers_runs(**run)
    context = args.prompt_len + args.output_len / 2
    rows = []
    print(f"\n{'figure':<28}{'engine':>14}{'transformers':>14}{'roofline':>14}{'of roofline':>13}{'vs HF':>8}")
    for b in batches:
        roof = b * bw / step_bytes(dims, args.layers, b, context, 2)
        e, t = ours["decode"][b]["tokens_per_s"], hf["decode"][b]["tokens_per_s"]
        rows.append({"figure": f"decode batch {b}", "engine": e, "transformers": t, "roofline": roof,
                     "fraction": e / roof, "ratio": e / t})
        print(f"{'decode batch ' + str(b):<28}{e:>14,.1f}{t:>14,.1f}{roof:>14,.1f}{e / roof:>12.1%}{e / t:>7.2f}x")
    e, t = ours["prefill_tokens_per_s"], hf["prefill_tokens_per_s"]
    rows.append({"figure": f"prefill {args.prefill_batch}x{args.prompt_len}", "engine": e, "transformers": t,
                 "ratio": e / t})
    print(f"{'prefill ' + str(args.prefill_batch) + 'x' + str(args.prompt_len):<28}{e:>14,.0f}{t:>14,.0f}"
          f"{'-':>14}{'-':>13}{e / t:>7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "layers": args.layers, "bandwidth_bytes_per_s": bw,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
