"""``matrixinfer ep-load``: the per-rank and per-expert load snapshot of a running EP instance
(``GET /ep/load`` of its API server), as JSON on stdout or in a file."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ep-load", help="JSON snapshot of an EP instance's per-rank and per-expert load")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the instance's API server")
    p.add_argument("--output", "-o", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.set_defaults(func=_ep_load)


def _ep_load(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/ep/load"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            snap = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {url}: HTTP {exc.code} ({exc.read()[:200].decode(errors='replace')})", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: {url}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(snap, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0
