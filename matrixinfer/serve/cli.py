"""``matrixinfer serve`` and ``matrixinfer worker``: the OpenAI-compatible server on one host and
the instances that join it from other hosts. Their flags are generated from
:class:`~matrixinfer.config.EngineConfig` and :class:`~matrixinfer.config.ServeConfig`."""

from __future__ import annotations

import argparse
import sys

from matrixinfer import envs
from matrixinfer.cli_args import add_dataclass_args, from_args
from matrixinfer.config import EngineConfig, ServeConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API (router + prefill + decode + EMS by default)")
    add_dataclass_args(p.add_argument_group("engine"), EngineConfig)
    add_dataclass_args(p.add_argument_group("deployment"), ServeConfig, defaults={"api_key": envs.api_key()})
    p.add_argument("--config", metavar="FILE.yaml", help="read flags from a YAML file of `flag-name: value` "
                   "lines (`true` for a switch); flags on the command line win (matrixinfer.cli.expand_config_file)")
    p.add_argument("--deploy", metavar="FILE.yaml", help="run a deployment spec (`matrixinfer plan --out`; pools, "
                   "ranks, EMS, ports and engine settings come from it; docs/cluster.md)")
    p.add_argument("--ray", metavar="ADDRESS", help="with --deploy: run it on the Ray cluster at ADDRESS (HOST:PORT "
                   "of its head, or `auto`)")
    p.set_defaults(func=_serve)

    w = sub.add_parser("worker", help="run one prefill, decode or EMS instance that joins a router")
    add_dataclass_args(w.add_argument_group("engine"), EngineConfig)
    w.add_argument("--role", required=True, choices=["prefill", "decode", "ems"])
    w.add_argument("--router", required=True, help="HOST:PORT of the router's control port")
    w.add_argument("--kv-host", default="127.0.0.1",
                   help="address this host is reached at for KV transfers (decode) or EMS traffic (ems)")
    w.add_argument("--ems", default=None, help="comma-separated EMS servers (default: the router's pool)")
    w.add_argument("--secret-file", default=None,
                   help="file (mode 0600) with the deployment secret (default: $MATRIXINFER_SECRET, then "
                        "$MATRIXINFER_SECRET_FILE); `matrixinfer serve` logs where its secret is")
    w.add_argument("--ems-capacity", default="512M", help="ems role: DRAM arena size")
    w.add_argument("--ssd-dir", default=None, help="ems role: SSD tier directory")
    w.add_argument("--ssd-capacity", default="0", help="ems role: SSD tier size")
    w.set_defaults(func=_worker)


def _configs(args: argparse.Namespace) -> tuple[EngineConfig, ServeConfig] | None:
    try:
        return from_args(EngineConfig, args), from_args(ServeConfig, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _worker_secret(args: argparse.Namespace) -> bytes | None:
    """The deployment secret a worker proves to the router and its peers; None (after saying why) if missing."""
    from matrixinfer.auth import load_secret

    try:
        secret = load_secret(args.secret_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if secret is None:
        print("error: a worker needs the deployment secret of the router it joins: give --secret-file (the "
              "file `matrixinfer serve` logged) or set MATRIXINFER_SECRET", file=sys.stderr)
    return secret


def _worker(args: argparse.Namespace) -> int:
    from matrixinfer.auth import AuthError

    secret = _worker_secret(args)
    if secret is None:
        return 1
    try:
        if args.role == "ems":
            return _ems_worker(args, secret)
        from matrixinfer.serve.worker import run_worker

        cfg = from_args(EngineConfig, args)
        return run_worker(args.role, args.router, cfg, args.kv_host, args.ems.split(",") if args.ems else None,
                          secret)
    except (ValueError, AuthError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _ems_worker(args: argparse.Namespace, secret: bytes) -> int:
    """An EMS server that joins the router's pool (it only needs the controller's address); it reads
    the same secret the same way (flag, then environment)."""
    import uuid

    from matrixinfer.ems.config import EmsServerConfig, parse_size
    from matrixinfer.ems.server import run_server
    from matrixinfer.serve.router_link import join

    sock, welcome = join(args.router, "ems", f"ems-{uuid.uuid4().hex[:8]}", secret, timeout=30)
    sock.close()
    if not welcome.ems_controller:
        print("error: the router has no EMS pool (started with --num-ems 0)", file=sys.stderr)
        return 1
    return run_server(EmsServerConfig(capacity=parse_size(args.ems_capacity), ssd_dir=args.ssd_dir,
                                      ssd_capacity=parse_size(args.ssd_capacity), listen=f"{args.kv_host}:0",
                                      controller=welcome.ems_controller, secret_file=args.secret_file))


def _serve(args: argparse.Namespace) -> int:
    import logging

    configs = _configs(args)
    if configs is None:
        return 1
    engine_cfg, serve_cfg = configs
    if args.deploy or args.ray:  # the deployment comes from a spec (matrixinfer.cluster)
        from matrixinfer.cluster.cli import resolve_deploy

        resolved = resolve_deploy(args, engine_cfg, serve_cfg)
        if isinstance(resolved, int):
            return resolved
        engine_cfg, serve_cfg = resolved
    if engine_cfg.node_rank > 0:  # another host of an EP instance: its ranks only, no API
        from matrixinfer.parallel.launch import run_node

        logging.basicConfig(level=serve_cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_node(engine_cfg)
    busy = _busy_port(serve_cfg)
    if busy:  # found before any model loads or worker starts
        print(f"error: {busy}", file=sys.stderr)
        return 1
    logging.basicConfig(level=serve_cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not serve_cfg.colocated:
        from matrixinfer.serve.launcher import serve_pdc

        return serve_pdc(engine_cfg, serve_cfg)
    return _serve_colocated(engine_cfg, serve_cfg)


def _busy_port(cfg: ServeConfig) -> str | None:
    """Why a port this deployment needs cannot be listened on, or None."""
    from matrixinfer.netio import format_addr, listen

    ports = [("--port", cfg.port)] + ([] if cfg.colocated else [("--router-port", cfg.control_port)])
    for flag, port in ports:
        try:
            listen(cfg.host, port).close()
        except OSError as exc:
            return (f"cannot listen on {format_addr(cfg.host, port)} ({exc.strerror or exc}); is another server "
                    f"running there? Choose another {flag}.")
    return None


def _serve_colocated(engine_cfg: EngineConfig, cfg: ServeConfig) -> int:
    import uvicorn

    from matrixinfer.engine.async_engine import AsyncEngine
    from matrixinfer.parallel.launch import make_engine
    from matrixinfer.serve.api_server import create_app
    from matrixinfer.serve.http_guard import uvicorn_config
    from matrixinfer.serve.worker import quiet_gc

    _reserve_a_core(engine_cfg)
    try:
        engine, ep_instance = make_engine(engine_cfg)  # --ep N: rank 0 of N rank processes
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    quiet_gc()
    async_engine = AsyncEngine(engine)
    try:
        app = create_app(async_engine, api_key=cfg.api_key, max_request_bytes=cfg.max_request_bytes,
                         reasoning_parser=cfg.reasoning_parser, protect_metrics=cfg.protect_metrics,
                         chat_template=cfg.chat_template, tool_call_parser=cfg.tool_call_parser)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        async_engine.shutdown()
        return 1
    if ep_instance is not None:
        from matrixinfer.parallel.metrics import add_ep_routes

        add_ep_routes(app, ep_instance.engine)
    print_banner(f"MatrixInfer serving '{engine.model_id}'", engine.model_id, cfg)
    server = uvicorn.Server(uvicorn_config(app, cfg))
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        pass
    finally:
        async_engine.shutdown()
        if ep_instance is not None:
            ep_instance.close()
    return 0 if server.started else 1


def _reserve_a_core(engine_cfg: EngineConfig) -> None:
    """A colocated CPU engine runs ``serving_threads(cores)`` threads, leaving a core to the API
    server in the same process (engine/cpu_affinity.py), unless ``MATRIXINFER_THREADS`` says
    otherwise. Expert-parallel ranks set their own share."""
    import os

    import torch

    from matrixinfer.engine.cpu_affinity import serving_threads
    from matrixinfer.model.device import resolve_device

    try:
        cpu = resolve_device(engine_cfg.device).type == "cpu"
    except ValueError:  # make_engine reports it
        return
    if cpu and envs.threads() is None and engine_cfg.ep == 1:
        torch.set_num_threads(serving_threads(os.cpu_count() or 1))


def print_banner(title: str, model_id: str, cfg: ServeConfig) -> None:
    """Where the server listens, and a request to try."""
    url = f"http://{cfg.host}:{cfg.port}"
    auth = " -H 'Authorization: Bearer <your API key>'" if cfg.api_key else ""  # never print the key itself
    print(f"{title} at {url}  (Ctrl-C to stop)\n"
          f"  try: curl {url}/v1/completions{auth} -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{model_id}\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 48, "
          f"\"temperature\": 0}}'\n"
          f"  or the openai client with base_url='{url}/v1'; metrics at {url}/metrics", flush=True)
