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


def expand_config_file(argv: list[str]) -> list[str]:
    """``--config FILE.yaml`` (vLLM's): the file's ``flag-name: value`` pairs become flags placed
    before the command line's own, so that flags given on the command line win. ``true`` gives a
    switch, ``false`` or null leaves it out; an unknown name fails like an unknown flag."""
    for i, a in enumerate(argv):
        if a == "--config" or a.startswith("--config="):
            path = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            rest = argv[:i] + argv[i + (1 if "=" in a else 2):]
            break
    else:
        return argv
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"error: --config {path!r}: {exc}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"error: --config {path!r}: expected a mapping of flag names to values")
    flags: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    command = next((j for j, a in enumerate(rest) if not a.startswith("-")), len(rest))
    return rest[:command + 1] + flags + rest[command + 1:]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(expand_config_file(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
