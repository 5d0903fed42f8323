"""``matrixinfer generate``: continue a prompt with a checkpoint (the default model without --model)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="print the continuation of a prompt")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    import sys

    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.model.device import resolve_device, resolve_dtype
    from matrixinfer.model.generate import generate
    from matrixinfer.model.loader import CheckpointError, load_model
    from matrixinfer.model.tokenizer import Tokenizer, TokenizerError

    if args.max_tokens < 1:
        print("error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    path = args.model or default_model_path()
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(None, device)
        tok = Tokenizer(path)
        model = load_model(path, dtype=dtype, device=device)
    except (CheckpointError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else model.config.eos_token_ids
    out = generate(model, [ids], args.max_tokens, args.temperature, eos, args.seed)[0]
    print(args.prompt + tok.decode(out))
    return 0
