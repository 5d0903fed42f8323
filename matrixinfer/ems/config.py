"""Settings of one EMS server: :class:`EmsServerConfig`, the one definition of ``ems-server``'s flags.

The flags are generated from the fields (:mod:`matrixinfer.cli_args`): name, default and help text
come from the dataclass. Sizes (``512M``, ``4G``) and the repeatable ``--namespace NAME=QUOTA[:TOKEN]``
need their own parsers, so those flags are added here, still named, defaulted and documented by
their fields.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from matrixinfer.cli_args import add_dataclass_args, field_docs, flag_name, from_args

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class NamespaceConfig:
    """Quota (DRAM bytes) and optional access token of one namespace."""

    quota: int
    token: str = ""


@dataclass(frozen=True)
class EmsServerConfig:
    """Settings of one EMS server process (``matrixinfer ems-server``, :func:`~matrixinfer.ems.server.run_server`).

    Attributes:
        capacity: DRAM arena size in bytes (flag: a size such as 4096, 512M or 4G)
        ssd_dir: directory of the SSD tier, kept across restarts (none: DRAM only)
        ssd_capacity: SSD tier size in bytes, e.g. 100G (0: no SSD tier)
        listen: HOST:PORT to accept clients on (port 0 picks a free one; an empty host is loopback)
        advertise: address clients should use (default: the listen address)
        namespaces: declared namespaces, NAME=QUOTA[:TOKEN] each: a DRAM quota and an access token
            (TOKEN as @FILE reads it from that file, keeping it out of the process list)
        closed: refuse namespaces that were not declared
        default_quota: DRAM quota in bytes of each undeclared namespace (default: the capacity the declared
            namespaces' quotas leave; undeclared namespaces never evict declared ones' entries)
        controller: HOST:PORT of an EMS controller to join
        etcd: etcd endpoint URL(s), comma-separated, to join (multi-host)
        cluster: ring name in the controller or etcd
        lease_ttl: membership lease in seconds (renewed every third of it)
        max_connections: connections served at once (more are closed as they arrive)
        idle_timeout: seconds a connection may send nothing, or stall mid-frame, before it is closed
        secret_file: file (mode 0600) with the deployment secret every client and the controller must prove
            (default: $MATRIXINFER_SECRET, then $MATRIXINFER_SECRET_FILE; none: connections are not authenticated)
    """

    capacity: int
    ssd_dir: str | None = None
    ssd_capacity: int = 0
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    namespaces: Mapping[str, NamespaceConfig] = field(default_factory=dict, metadata={"flag": "--namespace"})
    closed: bool = False
    default_quota: int | None = None
    controller: str | None = None
    etcd: str | None = None
    cluster: str = "default"
    lease_ttl: float = 3.0
    max_connections: int = 1024
    idle_timeout: float = 300.0
    secret_file: str | None = None


_SIZES = ("capacity", "ssd_capacity", "default_quota")


def parse_size(text: str) -> int:
    """``"512M"``, ``"4G"``, ``"1048576"`` -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
    except (ValueError, IndexError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 512M or 4G") from exc


def parse_namespace(text: str) -> tuple[str, NamespaceConfig]:
    """``NAME=QUOTA[:TOKEN]`` -> ``(NAME, NamespaceConfig)``; a token ``@PATH`` is read from that file
    (so it stays out of the process list)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"namespace {text!r} is not NAME=QUOTA[:TOKEN]")
    quota, _, token = rest.partition(":")
    if token.startswith("@"):
        try:
            token = Path(token[1:]).read_text().strip()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"namespace {name!r}: cannot read its token file {token[1:]}: "
                                             f"{exc.strerror or exc}") from None
        if not token:
            raise argparse.ArgumentTypeError(f"namespace {name!r}: its token file is empty")
    return name, NamespaceConfig(parse_size(quota), token)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``matrixinfer ems-server``, one per field of :class:`EmsServerConfig`."""
    fields = {f.name: f for f in dataclasses.fields(EmsServerConfig)}
    docs = field_docs(EmsServerConfig)
    for name in _SIZES:
        f = fields[name]
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag_name(f), dest=name, type=parse_size, required=True, metavar="SIZE",
                                help=docs[name])
        else:
            suffix = f" (default: {f.default})" if f.default is not None else ""
            parser.add_argument(flag_name(f), dest=name, type=parse_size, default=f.default, metavar="SIZE",
                                help=docs[name] + suffix)
    add_dataclass_args(parser, EmsServerConfig, skip=(*_SIZES, "namespaces"))
    parser.add_argument(flag_name(fields["namespaces"]), dest="namespaces", action="append", type=parse_namespace,
                        default=[], metavar="NAME=QUOTA[:TOKEN]", help=docs["namespaces"] + " (repeatable)")


def server_config(args: argparse.Namespace) -> EmsServerConfig:
    """The :class:`EmsServerConfig` of flags parsed by a parser that :func:`add_server_args` set up."""
    return from_args(EmsServerConfig, args, namespaces=dict(args.namespaces))
