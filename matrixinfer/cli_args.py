"""Command-line flags generated from config dataclasses, so each setting is defined once.

A field's flag is ``--field-name``; its default is the field's default; its help text is the
field's entry in the class docstring's ``Attributes:`` section. Booleans that default to True get
``--no-field-name``. ``metadata={"flag": "--other-name"}`` keeps an established flag name, and
``metadata={"choices": [...]}`` restricts the values (vLLM's ``arg_utils``, mini-sglang's
``server/args.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def field_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of the docstring's ``Attributes:`` section (continuation lines joined)."""
    doc = cls.__doc__ or ""
    docs: dict[str, str] = {}
    inside, current = False, None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not stripped:
            current = None
            continue
        m = re.match(r"^(\w+(?:\s*/\s*\w+)*):\s*(.*)$", stripped)
        if m and line.startswith(" " * 8) and not line.startswith(" " * 12):
            names = [n.strip() for n in m.group(1).split("/")]
            for n in names:
                docs[n] = m.group(2)
            current = names
        elif current:
            for n in current:
                docs[n] += " " + stripped
    return docs


def _base_type(tp: Any) -> tuple[type, bool]:
    """The scalar type of an annotation and whether it admits None (``int | None`` -> int, True)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def flag_name(f: dataclasses.Field) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    if f.default is True:
        return f"--no-{name}"
    return f"--{name}"


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                       skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per field of ``cls`` (except ``skip``); ``defaults`` overrides field defaults."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        overridden = f.name in (defaults or {})
        default = (defaults or {}).get(f.name, f.default)
        if default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} has no default: give it one or skip it")
        tp, _ = _base_type(hints[f.name])
        help_text = docs.get(f.name, "")
        if tp is bool:
            if default is True:
                help_text = f"turn off: {help_text}"
            action = "store_false" if default is True else "store_true"
            parser.add_argument(flag_name(f), dest=f.name, action=action, default=default, help=help_text)
            continue
        if tp not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for fields of type {hints[f.name]}")
        # an overridden default may come from the environment (a secret): never print it
        suffix = f" (default: {default})" if default is not None and not overridden else ""
        parser.add_argument(flag_name(f), dest=f.name, type=tp, default=default,
                            choices=f.metadata.get("choices"), help=help_text + suffix)


def from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """An instance of ``cls`` from the parsed flags that :func:`add_dataclass_args` added."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}
    values.update(overrides)
    return cls(**values)


def to_argv(cfg: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that reproduce ``cfg`` (a dataclass instance) in a child process: one per field
    whose value differs from its default (the inverse of :func:`from_args`)."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        if f.name in skip or not f.init:
            continue
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            out.append(flag_name(f))  # the flag flips the default
        elif value is not None:
            out += [flag_name(f), str(value)]
    return out
