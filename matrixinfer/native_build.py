"""Build optional C helpers with the system compiler on first use, cached on disk.

Shared by the model's CPU kernels (``matrixinfer.kernels``) and EMS's read helpers
(``matrixinfer.ems.native``); imports nothing heavier than the standard library, so EMS stays
independent of torch. A library is cached under ``$MATRIXINFER_CACHE`` (default
``~/.cache/matrixinfer``) in a file named by a hash of its sources, flags and whatever else the
caller says it depends on (the CPU, the Python build), and installed atomically, so concurrent
first uses each see a complete library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("MATRIXINFER_CACHE", Path.home() / ".cache" / "matrixinfer"))


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(name: str, subdir: str, sources: list[Path], flags: list[str], libs: list[str] = (),
                  depends: list[Path] = (), key_extra: str = "") -> Path | None:
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
