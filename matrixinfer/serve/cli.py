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
    p.add_argument("--store-decode-kv", action="store_true",
                   help="PDC: decode instances also store generated KV blocks in the EMS context cache")


def engine_config(args: argparse.Namespace):
    from matrixinfer.config import EngineConfig

    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, device=args.device, dtype=args.dtype,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, kv_cache_fraction=args.kv_cache_fraction,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        store_generated_kv=args.store_decode_kv)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API (router + prefill + decode + EMS by default)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MATRIXINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MATRIXINFER_API_KEY)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--colocated", action="store_true", help="one process, one engine (no P/D disaggregation)")
    p.add_argument("--num-prefill", type=int, default=1, help="prefill instances (PDC mode)")
    p.add_argument("--num-decode", type=int, default=1, help="decode instances (PDC mode)")
    p.add_argument("--num-ems", type=int, default=1, help="EMS memory-pool servers (PDC mode; 0 disables the pool)")
    p.add_argument("--ems-capacity", default="512M", help="DRAM per EMS server, e.g. 4G")
    p.add_argument("--router-port", type=int, default=None,
                   help="control port where workers join (default: --port + 1)")
    p.add_argument("--reserve-timeout", type=float, default=30.0,
                   help="seconds a decode instance holds blocks for a KV transfer that does not arrive")
    p.add_argument("--prefill-kv-cache-memory", type=int, default=None)
    p.add_argument("--decode-kv-cache-memory", type=int, default=None)
    p.add_argument("--worker-threads", type=int, default=None, help="torch threads per worker process")
    p.set_defaults(func=_serve)

    w = sub.add_parser("worker", help="run one prefill, decode or EMS instance that joins a router")
    add_engine_args(w)
    w.add_argument("--role", required=True, choices=["prefill", "decode", "ems"])
    w.add_argument("--router", required=True, help="HOST:PORT of the router's control port")
    w.add_argument("--kv-host", default="127.0.0.1",
                   help="address this host is reached at for KV transfers (decode) or EMS traffic (ems)")
    w.add_argument("--ems", default=None, help="comma-separated EMS servers (default: the router's pool)")
    w.add_argument("--ems-capacity", default="512M", help="ems role: DRAM arena size")
    w.add_argument("--ssd-dir", default=None, help="ems role: SSD tier directory")
    w.add_argument("--ssd-capacity", default="0", help="ems role: SSD tier size")
    w.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    import socket
    import uuid

    if args.role == "ems":
        import msgspec

        from matrixinfer.ems.server import parse_size, run_server
        from matrixinfer.serve import messages as m
        from matrixinfer.serve.wire import parse_addr, recv_msg, send_msg

        sock = socket.create_connection(parse_addr(args.router), timeout=30)
        send_msg(sock, m.Join("ems", f"ems-{uuid.uuid4().hex[:8]}"))
        welcome = recv_msg(sock, msgspec.msgpack.Decoder(m.RouterToWorker), "router")
        sock.close()
        if not welcome.ems_controller:
            print("error: the router has no EMS pool (started with --num-ems 0)")
            return 1
        ns = argparse.Namespace(capacity=parse_size(args.ems_capacity), ssd_dir=args.ssd_dir,
                                ssd_capacity=parse_size(args.ssd_capacity), listen=f"{args.kv_host}:0",
                                advertise=None, namespace=[], closed=False, default_quota=None,
                                controller=welcome.ems_controller, etcd=None, cluster="default", lease_ttl=3.0)
        return run_server(ns)
    from matrixinfer.serve.worker import run_worker

    return run_worker(args.role, args.router, engine_config(args), args.kv_host,
                      args.ems.split(",") if args.ems else None)


def _serve(args: argparse.Namespace) -> int:
    import logging
    import sys

    if not args.colocated:
        from matrixinfer.ems.server import parse_size
        from matrixinfer.serve.launcher import serve_pdc

        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        args.ems_capacity = parse_size(args.ems_capacity)
        if args.router_port is None:
            args.router_port = args.port + 1
        return serve_pdc(args)

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
    from matrixinfer.serve.worker import quiet_gc

    quiet_gc()
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
