"""The ``matrixinfer`` command line.

Each package contributes its subcommands through a ``register(subparsers)`` function in its own
``cli`` module, listed in :data:`COMMAND_MODULES`; heavy imports happen inside the handlers so that
``matrixinfer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define register(subparsers); each handler is set with parser.set_defaults(func=...).
COMMAND_MODULES = [
    "matrixinfer.model.cli",
    "matrixinfer.serve.cli",
    "matrixinfer.bench.cli",
    "matrixinfer.ems.cli",
    "matrixinfer.sim.cli",
    "matrixinfer.train.cli",
    "matrixinfer.quant.cli",
    "matrixinfer.parallel.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matrixinfer", description=__doc__.splitlines()[0])
    from matrixinfer import __version__

    parser.add_argument("--version", action="version", version=f"matrixinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that package has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
