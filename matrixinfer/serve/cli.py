"""``matrixinfer serve``: the OpenAI-compatible server on one host."""

from __future__ import annotations

import argparse
import os


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by every command that runs an engine."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: directory name)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache size in bytes")
    p.add_argument("--kv-cache-fraction", type=float, default=0.05,
                   help="fraction of available memory for the KV cache (default 0.05)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per step")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")


def engine_config(args: argparse.Namespace):
    from matrixinfer.config import EngineConfig

    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, device=args.device, dtype=args.dtype,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, kv_cache_fraction=args.kv_cache_fraction,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MATRIXINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MATRIXINFER_API_KEY)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import logging
    import sys

    import uvicorn

    from matrixinfer.engine.async_engine import AsyncEngine
    from matrixinfer.engine.llm_engine import LLMEngine
    from matrixinfer.serve.api_server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(engine_config(args))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, api_key=args.api_key)
    url = f"http://{args.host}:{args.port}"
    auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
    print(f"MatrixInfer serving '{engine.model_id}' at {url}  (Ctrl-C to stop)\n"
          f"  try: curl {url}/v1/completions{auth} -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{engine.model_id}\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 48, "
          f"\"temperature\": 0}}'\n"
          f"  or the openai client with base_url='{url}/v1'; metrics at {url}/metrics", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        async_engine.shutdown()
    return 0
