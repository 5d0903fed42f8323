"""Every environment variable MatrixInfer reads, in one place (vLLM's ``envs.py``).

Each variable is read when its accessor is called, not at import, so tests and launchers that set
one before starting work see it. Settings that users choose per deployment are CLI flags generated
from the config dataclasses (:mod:`matrixinfer.cli_args`); these variables are for what belongs to
the machine or the process: caches, optional native code, thread counts, secrets.
"""

from __future__ import annotations

import os
from pathlib import Path

_DEFAULT_HOME = Path.home() / ".cache" / "matrixinfer"

#: name -> what it does (listed in docs/architecture.md)
VARIABLES: dict[str, str] = {
    "MATRIXINFER_HOME": "where generated models and training state live (default ~/.cache/matrixinfer)",
    "MATRIXINFER_CACHE": "where compiled native helpers are cached (default ~/.cache/matrixinfer)",
    "MATRIXINFER_KERNELS": "0 turns the native CPU kernels off (the PyTorch paths run instead)",
    "MATRIXINFER_TRITON": "0 turns the Triton kernels of the cuda backend off (the PyTorch paths run on the GPU)",
    "MATRIXINFER_EMS_NATIVE": "0 turns EMS's native read helpers off (hashlib and Python loops instead)",
    "MATRIXINFER_THREADS": "torch threads of an engine process on CPU (default: torch's choice)",
    "MATRIXINFER_LOG": "log level of worker processes (default INFO)",
    "MATRIXINFER_API_KEY": "API key the HTTP server requires when --api-key is not given",
    "MATRIXINFER_SECRET": "deployment secret of the internal ports (router control, KV, EMS); `serve` generates one",
    "MATRIXINFER_SECRET_FILE": "file (mode 0600) holding the deployment secret, read when MATRIXINFER_SECRET is unset",
    "MATRIXINFER_EMS_SOCKET_BUFFER": "SO_SNDBUF/SO_RCVBUF bytes of EMS server sockets (0: the kernel's default)",
    "MATRIXINFER_PROGRESS_LINES": "1: progress bars are written as lines for a parent process (the launcher sets it)",
    "CC": "the C compiler used for native helpers (default: cc, then gcc)",
}


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def home() -> Path:
    return Path(os.environ.get("MATRIXINFER_HOME") or _DEFAULT_HOME)


def cache_dir() -> Path:
    return Path(os.environ.get("MATRIXINFER_CACHE") or _DEFAULT_HOME)


def kernels_enabled() -> bool:
    return _flag("MATRIXINFER_KERNELS", True)


def triton_enabled() -> bool:
    return _flag("MATRIXINFER_TRITON", True)


def ems_native_enabled() -> bool:
    return _flag("MATRIXINFER_EMS_NATIVE", True)


def threads() -> int | None:
    n = _int("MATRIXINFER_THREADS", None)
    return None if n is None else max(1, n)


def log_level() -> str:
    return os.environ.get("MATRIXINFER_LOG") or "INFO"


def api_key() -> str | None:
    return os.environ.get("MATRIXINFER_API_KEY") or None


def secret() -> str | None:
    return os.environ.get("MATRIXINFER_SECRET") or None


def secret_file() -> str | None:
    return os.environ.get("MATRIXINFER_SECRET_FILE") or None


def ems_socket_buffer() -> int:
    return _int("MATRIXINFER_EMS_SOCKET_BUFFER", 0) or 0


def progress_lines() -> bool:
    return _flag("MATRIXINFER_PROGRESS_LINES", False)


def c_compiler() -> str | None:
    return os.environ.get("CC") or None
