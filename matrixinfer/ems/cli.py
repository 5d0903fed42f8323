"""Command line of the memory pool: ``ems-server``, ``ems stats`` and ``ems controller``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the EMS subcommands to the top-level ``matrixinfer`` parser."""
    from matrixinfer.ems.config import add_server_args

    server = subparsers.add_parser("ems-server", help="run one EMS memory-pool server (DRAM arena + SSD tier)")
    add_server_args(server)
    server.set_defaults(func=_run_server)

    ems = subparsers.add_parser("ems", help="inspect or coordinate an EMS memory pool")
    ems_sub = ems.add_subparsers(dest="ems_command", metavar="EMS_COMMAND")
    stats = ems_sub.add_parser("stats", help="usage, hit rate, evictions and spills per server and namespace")
    stats.add_argument("--servers", help="comma-separated HOST:PORT list")
    stats.add_argument("--controller", help="HOST:PORT of an EMS controller")
    stats.add_argument("--etcd", help="etcd endpoint URL(s)")
    stats.add_argument("--cluster", default="default", help="ring name in etcd")
    stats.add_argument("--json", action="store_true", help="print raw JSON instead of a table")
    stats.add_argument("--namespace", default="default",
                       help="namespace of the session that asks (namespaces with a token show only to their own)")
    stats.add_argument("--token-file", help="file holding that namespace's token (kept out of the process list)")
    stats.add_argument("--secret-file", help="file holding the deployment secret the servers and controller "
                       "require (default: $MATRIXINFER_SECRET or $MATRIXINFER_SECRET_FILE)")
    stats.set_defaults(func=_stats)
    ctl = ems_sub.add_parser("controller", help="run the single-host membership controller")
    ctl.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    ctl.add_argument("--secret-file", help="file holding the deployment secret servers and clients must prove "
                     "(default: $MATRIXINFER_SECRET or $MATRIXINFER_SECRET_FILE; none: not authenticated)")
    ctl.set_defaults(func=_controller)
    ems.set_defaults(func=lambda args: (ems.print_help(), 2)[1])


def _run_server(args: argparse.Namespace) -> int:
    from matrixinfer.ems.config import server_config
    from matrixinfer.ems.server import run_server

    return run_server(server_config(args))


def _controller(args: argparse.Namespace) -> int:
    import time

    from matrixinfer.auth import load_secret
    from matrixinfer.ems.controller import Controller
    from matrixinfer.netio import parse_addr

    try:
        secret = load_secret(args.secret_file)
    except ValueError as exc:
        print(f"ems controller: {exc}")
        return 2
    ctl = Controller(*parse_addr(args.listen), secret=secret).start()
    print(f"EMS controller listening on {ctl.address}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ctl.stop()
    return 0


def format_stats(per_server: dict[str, dict | str]) -> str:
    """A table with one row per server and namespace (``per_server`` maps addr -> stats or error)."""
    head = f"{'server':<22} {'namespace':<24} {'dram used':>12} {'ssd used':>12} {'entries':>8} " \
           f"{'hit rate':>8} {'hits':>8} {'misses':>8} {'evictions':>9} {'spills':>7} {'promoted':>8}"
    lines = [head, "-" * len(head)]
    for addr, st in per_server.items():
        if isinstance(st, str):
            lines.append(f"{addr:<22} unreachable: {st}")
            continue
        lines.append(f"{addr:<22} {'(server)':<24} {_mb(st['dram_used'])}/{_mb(st['capacity'])} "
                     f"{_mb(st['ssd_used'])}/{_mb(st['ssd_capacity'])}  leases={st['leases']}")
        for ns, c in st["namespaces"].items():
            hits, misses = c.get("hits", 0), c.get("misses", 0)
            rate = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
            lines.append(f"{'':<22} {ns:<24} {_mb(c['dram_bytes']):>12} {_mb(c['ssd_bytes']):>12} "
                         f"{c['dram_entries'] + c['ssd_entries']:>8} {rate:>8} {hits:>8} {misses:>8} "
                         f"{c.get('evictions', 0):>9} {c.get('spills', 0):>7} {c.get('promotions', 0):>8}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f}MB"


def _stats(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from matrixinfer.auth import load_secret
    from matrixinfer.ems.connection import EmsError, server_stats
    from matrixinfer.ems.membership import membership_from

    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else ""
        secret = load_secret(args.secret_file)
        addrs = membership_from(args.servers, args.controller, args.etcd, args.cluster, secret).members()
    except (ValueError, OSError, ConnectionError) as exc:
        print(f"ems stats: {exc}")
        return 2
    per_server: dict[str, dict | str] = {}
    for addr in addrs:
        try:
            per_server[addr] = server_stats(addr, args.namespace, token, secret=secret)
        except (OSError, EmsError) as exc:
            per_server[addr] = str(exc)
    if not per_server and not args.json:
        print("no live EMS servers in this view")
        return 1
    print(json.dumps(per_server, indent=2) if args.json else format_stats(per_server))
    return 0 if all(isinstance(v, dict) for v in per_server.values()) else 1
