"""Native CPU kernels, compiled on first use with the system C compiler and called through ctypes.

The kernels are optional: without a C compiler (or with ``MATRIXINFER_KERNELS=0``) every caller
falls back to its pure-PyTorch path, which computes the same thing more slowly. A built library is
cached under ``$MATRIXINFER_CACHE`` (default ``~/.cache/matrixinfer``), keyed by the source, the
compiler flags and the CPU, so a shared home directory never runs code built for another CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("paged_mla.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("MATRIXINFER_CACHE", Path.home() / ".cache" / "matrixinfer")) / "kernels"


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: using the PyTorch attention path (slower on CPU)")
        return None
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = cache_dir() / f"paged_mla-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SRC), "-lm", "-lmvec"], check=True, capture_output=True, text=True)
            os.replace(tmp, out)  # atomic: concurrent builders each install a complete library
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("building the CPU attention kernel failed, using the PyTorch path: %s", detail.strip()[:500])
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    f = lib.mi_paged_mla
    f.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the native kernels can be used (built now if needed; never raises)."""
    global _lib, _tried
    if os.environ.get("MATRIXINFER_KERNELS", "1") == "0":
        return False
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except OSError as e:  # e.g. a read-only cache directory, an unloadable library
                    log.warning("CPU attention kernel unavailable, using the PyTorch path: %s", e)
                    _lib = None
                _tried = True
    return _lib is not None


def paged_mla(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, tok_seq: torch.Tensor,
              tok_nkeys: torch.Tensor, rank: int, block_size: int, scale: float) -> torch.Tensor:
    """Latent-space attention straight from a paged cache (see ``paged_mla.c``).

    ``q`` ``[T, H, D]`` float32 (absorbed queries: ``q_nope W_UK`` then the rotated ``q_pe``);
    ``cache`` ``[num_slots, D]`` float32 (one layer); ``block_tables`` ``[S, W]`` int32;
    ``tok_seq``/``tok_nkeys`` ``[T]`` int32: each token's sequence row and how many keys it sees.
    Returns ``[T, H, rank]``.
    """
    if not available():
        raise RuntimeError("the native paged MLA kernel is not available")
    for name, t, dt in (("q", q, torch.float32), ("cache", cache, torch.float32), ("block_tables", block_tables, torch.int32),
                        ("tok_seq", tok_seq, torch.int32), ("tok_nkeys", tok_nkeys, torch.int32)):
        if t.dtype != dt or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU {dt} tensor, got {t.dtype} on {t.device}")
    n, h, d = q.shape
    if cache.shape[1] != d or block_tables.dim() != 2 or tok_seq.shape != (n,) or tok_nkeys.shape != (n,):
        raise ValueError("paged_mla: inconsistent shapes")
    out = torch.empty(n, h, rank, dtype=torch.float32)
    _lib.mi_paged_mla(q.data_ptr(), cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
                      tok_seq.data_ptr(), tok_nkeys.data_ptr(), n, h, d, rank, block_size, scale,
                      out.data_ptr(), torch.get_num_threads())
    return out
