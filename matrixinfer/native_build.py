"""Optional C helpers: built with the system compiler on first use, cached on disk, loaded once per
process, and bound to Python from their C header.

Shared by the model's CPU kernels (``matrixinfer.kernels``) and EMS's read helpers
(``matrixinfer.ems.native``); imports nothing heavier than the standard library, so EMS stays
independent of torch. A library is cached under ``$MATRIXINFER_CACHE`` (default
``~/.cache/matrixinfer``) in a file named by a hash of its sources, header, flags and whatever else
the caller says it depends on (the CPU, the Python build), and installed atomically, so concurrent
first uses each see a complete library.

Each library has one header that declares every function and struct it exports. The ``.c`` files
``#include`` it, so the compiler checks each definition against its declaration, and
:func:`parse_header` turns the same declarations into ctypes signatures and ``ctypes.Structure``
classes: a binding is written once, in C. ctypes rather than cffi: a ctypes call takes tensor
addresses as plain ints (no per-pointer cast on the decode hot path), and ``ctypes.PyDLL`` keeps
the GIL for helpers that use the Python C API.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrixinfer import envs

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return envs.cache_dir()


def compiler() -> str | None:
    return envs.c_compiler() or shutil.which("cc") or shutil.which("gcc")


def build_library(name: str, subdir: str, sources: Sequence[Path], flags: Sequence[str], libs: Sequence[str] = (),
                  depends: Sequence[Path] = (), key_extra: str = "") -> Path | None:
    """The path of the compiled shared library ``name`` (built now if needed), or None (logged)
    when there is no compiler, the cache directory is unusable or the build fails."""
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found: %s unavailable", name)
        return None
    blob = b"".join(p.name.encode() + p.read_bytes() for p in [*sources, *depends])
    key = hashlib.sha256(blob + " ".join([cc, *flags, *libs, key_extra]).encode()).hexdigest()[:16]
    root = cache_root() / subdir
    out = root / f"{name}-{key}.so"
    if out.exists():
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
    except OSError as e:
        log.warning("cannot build %s in %s (%s)", name, root, e)
        return None
    log.info("building %s (first use; cached in %s)", name, root)
    try:
        subprocess.run([cc, *flags, "-o", tmp, *map(str, sources), *libs], check=True, capture_output=True, text=True)
        os.replace(tmp, out)  # atomic: concurrent builders each install a complete library
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building %s failed: %s", name, detail.strip()[:500])
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# --- bindings from the header ---------------------------------------------------------------------

class HeaderError(ValueError):
    """A header declaration the binder does not understand, or a declared function the library lacks."""


_SCALARS: dict[str, Any] = {
    "void": None, "char": ctypes.c_char, "int": ctypes.c_int, "int8_t": ctypes.c_int8, "uint8_t": ctypes.c_uint8,
    "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64,
    "float": ctypes.c_float, "double": ctypes.c_double, "size_t": ctypes.c_size_t, "Py_ssize_t": ctypes.c_ssize_t,
}
_QUALIFIERS = {"const", "volatile", "restrict", "extern"}
_STRUCT = re.compile(r"typedef\s+struct\s*\w*\s*\{(?P<body>[^{}]*)\}\s*(?P<name>\w+)\s*;")
_FUNCTION = re.compile(r"^(?P<ret>[\w\s*]+?)\b(?P<name>\w+)\s*\((?P<params>[^()]*)\)$")


@dataclass(frozen=True)
class Header:
    """The functions and structs a C header declares, as ctypes types: ``functions`` maps a name
    to ``(restype, argtypes)``; ``structs`` holds a ``ctypes.Structure`` subclass per typedef."""

    path: Path
    functions: dict[str, tuple[Any, list[Any]]]
    structs: dict[str, type[ctypes.Structure]]

    def bind(self, lib: ctypes.CDLL) -> ctypes.CDLL:
        """Set every declared function's restype and argtypes on ``lib``."""
        for name, (restype, argtypes) in self.functions.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise HeaderError(f"{self.path}: {name} is declared but {lib._name} does not export it") from None
            fn.restype, fn.argtypes = restype, argtypes
        return lib


def _declarator(text: str, where: str) -> tuple[str, int, str]:
    """``(base type, pointer depth, name)`` of a declaration such as ``const float *x``."""
    tokens = [t for t in re.findall(r"\w+|\*|\S", text) if t not in _QUALIFIERS]
    words = [t for t in tokens if t != "*"]
    if len(words) != 2 or any(not w.isidentifier() for w in words):
        raise HeaderError(f"{where}: cannot bind the declaration {text.strip()!r}")
    return words[0], tokens.count("*"), words[1]


def _ctype(base: str, depth: int, structs: dict[str, type[ctypes.Structure]], where: str, *, field: bool) -> Any:
    if base not in _SCALARS and base not in structs and base != "PyObject":
        raise HeaderError(f"{where}: unsupported type {base!r}")
    if depth == 0:
        if base == "PyObject" or (base == "void" and field):
            raise HeaderError(f"{where}: {base} by value")
        return structs[base] if base in structs else _SCALARS[base]
    if depth == 1 and base == "PyObject":
        return ctypes.py_object
    if depth == 1 and base in structs and not field:
        return ctypes.POINTER(structs[base])
    return ctypes.c_void_p  # data pointers: pass addresses as ints (tensor.data_ptr()), bytes or None


def parse_header(path: Path) -> Header:
    """Bindings for every function prototype and ``typedef struct { ... } Name;`` of a header.

    Understands the plain C the project's headers use: scalar types (``int``, ``float``, the
    ``<stdint.h>`` types, ``size_t``, ``Py_ssize_t``), pointers to them, to declared structs and
    to ``PyObject``; preprocessor lines are skipped. Anything else raises :class:`HeaderError`
    naming the header and declaration, so a header change can never bind silently wrong."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", " ", path.read_text(), flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    structs: dict[str, type[ctypes.Structure]] = {}
    for m in _STRUCT.finditer(text):
        name, fields = m.group("name"), []
        for decl in filter(str.strip, m.group("body").split(";")):
            where = f"{path}: struct {name}"
            first, *rest = decl.split(",")  # const float *a, *b;
            base = _declarator(first, where)[0]
            for _, depth, fname in [_declarator(first, where), *(_declarator(f"{base} {d}", where) for d in rest)]:
                fields.append((fname, _ctype(base, depth, structs, f"{where}.{fname}", field=True)))
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields, "__doc__": f"``{name}`` of {path.name}"})
    functions: dict[str, tuple[Any, list[Any]]] = {}
    for decl in filter(str.strip, _STRUCT.sub(" ", text).split(";")):
        fm = _FUNCTION.match(" ".join(decl.split()))
        if fm is None:
            raise HeaderError(f"{path}: cannot bind the declaration {' '.join(decl.split())!r}")
        name, where = fm.group("name"), f"{path}: {fm.group('name')}"
        ret = fm.group("ret").split()
        restype = _ctype(*_declarator(" ".join(ret) + " _", where)[:2], structs, where, field=False)
        params = [p for p in fm.group("params").split(",") if p.strip() not in ("", "void")]
        functions[name] = (restype, [_ctype(*_declarator(p, where)[:2], structs, where, field=False) for p in params])
    return Header(path, functions, structs)


# --- one cached loader ------------------------------------------------------------------------------

class NativeLibrary:
    """One optional C library: built on first use (see :func:`build_library`), loaded once per
    process (thread-safe), its functions bound from ``header``. :meth:`load` returns None, and
    logs ``fallback`` once, when ``enabled()`` is false at the first call, there is no compiler (or,
    with ``python_api``, no Python headers), or the build fails.

    ``python_api``: the library calls the Python C API, so it is built against this Python's
    headers (and keyed by its version) and loaded with ``ctypes.PyDLL``, which keeps the GIL.
    """

    def __init__(self, name: str, subdir: str, sources: Sequence[Path], header: Path, flags: Sequence[str], *,
                 enabled: Callable[[], bool], fallback: str, libs: Sequence[str] = (), depends: Sequence[Path] = (),
                 key_extra: Callable[[], str] = lambda: "", python_api: bool = False) -> None:
        self.name, self.subdir, self.header_path = name, subdir, header
        self.sources, self.flags, self.libs = list(sources), list(flags), list(libs)
        self.depends = [header, *(p for p in depends if p != header)]
        self.enabled, self.fallback, self.key_extra, self.python_api = enabled, fallback, key_extra, python_api
        self._lock = threading.Lock()
        self._header: Header | None = None
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    @property
    def header(self) -> Header:
        """The header's bindings (parsed once; needs no compiler)."""
        if self._header is None:
            self._header = parse_header(self.header_path)
        return self._header

    @property
    def structs(self) -> dict[str, type[ctypes.Structure]]:
        return self.header.structs

    def load(self) -> ctypes.CDLL | None:
        """The bound library, built and loaded on the first call; None where it is unavailable."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._lib = self._load() if self.enabled() else None
                    self._tried = True
        return self._lib

    def available(self) -> bool:
        return self.load() is not None

    def forget(self) -> None:
        """Drop the loaded library, so the next :meth:`load` decides again (tests, environment changes)."""
        with self._lock:
            self._lib, self._tried = None, False

    def _load(self) -> ctypes.CDLL | None:
        flags, key_extra = list(self.flags), self.key_extra()
        if self.python_api:
            include = sysconfig.get_paths().get("include", "")
            if not os.path.exists(os.path.join(include, "Python.h")):
                log.info("no Python headers for %s: %s", self.name, self.fallback)
                return None
            flags.append(f"-I{include}")
            key_extra += sys.version
        try:
            header = self.header
            out = build_library(self.name, self.subdir, self.sources, flags, self.libs, self.depends, key_extra)
            if out is None:
                log.warning("%s unavailable: %s", self.name, self.fallback)
                return None
            return header.bind((ctypes.PyDLL if self.python_api else ctypes.CDLL)(str(out)))
        except (OSError, HeaderError) as e:  # a read-only cache, an unloadable library, a header mismatch
            log.warning("%s unavailable (%s): %s", self.name, e, self.fallback)
            return None
