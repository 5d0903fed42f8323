"""Native CPU kernels, compiled on first use with the system C compiler and called through ctypes.

The kernels are optional: without a C compiler (or with ``MATRIXINFER_KERNELS=0``) every caller
falls back to its pure-PyTorch path, which computes the same thing more slowly. A built library is
cached under ``$MATRIXINFER_CACHE/kernels`` (default ``~/.cache/matrixinfer``), keyed by the
sources, the compiler flags and the CPU, so a shared home directory never runs code built for
another CPU (see :mod:`matrixinfer.native_build`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from matrixinfer.native_build import build_library

log = logging.getLogger(__name__)

_SOURCES = sorted(Path(__file__).parent.glob("*.c"))
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))
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


_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class MiLayer(ctypes.Structure):
    """``MiLayer`` of ``layer.c``: one decoder layer's dimensions and weight pointers."""

    _fields_ = [("hidden", _I64), ("heads", _I64), ("q_lora", _I64), ("nope", _I64), ("rope", _I64),
                ("v_dim", _I64), ("rank", _I64), ("eps", _F32), ("scale", _F32), ("interleaved", ctypes.c_int),
                *[(n, _PTR) for n in ("in_norm", "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o_proj",
                                      "post_norm", "mlp_gate", "mlp_up", "mlp_down")],
                ("mlp_inter", _I64),
                *[(n, _PTR) for n in ("router", "router_bias", "experts_gate_up", "experts_down")],
                ("n_experts", _I64), ("n_group", _I64), ("topk_group", _I64), ("top_k", _I64), ("moe_inter", _I64),
                ("norm_topk", ctypes.c_int), ("scaling", _F32), ("cache", _PTR)]


class MiStep(ctypes.Structure):
    """``MiStep`` of ``layer.c``: the per-step attention metadata every layer shares."""

    _fields_ = [("cos", _PTR), ("sin", _PTR), ("slots", _PTR), ("block_tables", _PTR), ("tok_seq", _PTR),
                ("tok_nkeys", _PTR), ("bt_stride", _I64), ("block_size", _I64)]


def decoder_layer(layer: MiLayer, step: MiStep, x: torch.Tensor) -> None:
    """Run one decoder layer on the residual stream ``x`` ``[T, hidden]`` in place (see ``layer.c``).
    The caller builds ``layer`` and ``step`` from tensors it keeps alive and has checked."""
    rc = _lib.mi_decoder_layer(ctypes.byref(layer), ctypes.byref(step), x.data_ptr(), x.shape[0],
                               torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native decoder layer failed ({'out of memory' if rc == -2 else 'unsupported routing'})")


def _build() -> ctypes.CDLL | None:
    out = build_library("matrixinfer-kernels", "kernels", _SOURCES, _FLAGS, ["-lm", "-lmvec"], _HEADERS, _cpu_id())
    if out is None:
        log.warning("native CPU kernels unavailable: using the PyTorch paths (slower on CPU)")
        return None
    lib = ctypes.CDLL(str(out))
    f = lib.mi_paged_mla
    f.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ptr, i64, i64, ptr,
                  ctypes.c_int]
    lib.mi_mla_q_prolog.restype = None
    lib.mi_mla_q_prolog.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.mi_mla_kv_prolog.restype = None
    lib.mi_mla_kv_prolog.argtypes = [ptr, ptr, ctypes.c_float, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr,
                                     ctypes.c_int]
    g = lib.mi_moe_experts
    g.restype = None
    g.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.mi_decoder_layer.restype = ctypes.c_int
    lib.mi_decoder_layer.argtypes = [ctypes.POINTER(MiLayer), ctypes.POINTER(MiStep), ptr, i64, ctypes.c_int]
    lib.mi_argmax_rows.restype = None
    lib.mi_argmax_rows.argtypes = [ptr, i64, i64, ptr]
    lib.mi_linear.restype = None
    lib.mi_linear.argtypes = [ptr, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.mi_rmsnorm.restype = None
    lib.mi_rmsnorm.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    lib.mi_v3_route.restype = ctypes.c_int
    lib.mi_v3_route.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_float, ptr, ptr, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the native kernels can be used (built on the first call if needed; never raises).
    ``MATRIXINFER_KERNELS=0`` at that first call turns them off for the process."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = None if os.environ.get("MATRIXINFER_KERNELS", "1") == "0" else _build()
                except OSError as e:  # e.g. a read-only cache directory, an unloadable library
                    log.warning("CPU kernels unavailable, using the PyTorch paths: %s", e)
                    _lib = None
                _tried = True
    return _lib is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether a native kernel may replace a PyTorch computation on ``tensors``: float32 CPU
    tensors, gradients off (the kernels have no backward), and the library built."""
    if torch.is_grad_enabled():
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype is not torch.float32:
            return False
    return available()


def paged_mla(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, tok_seq: torch.Tensor,
              tok_nkeys: torch.Tensor, rank: int, block_size: int, scale: float,
              w_kv_b: torch.Tensor | None = None, nope: int = 0, v_dim: int = 0) -> torch.Tensor:
    """Latent-space attention straight from a paged cache (see ``paged_mla.c``).

    ``q`` ``[T, H, D]`` float32 (absorbed queries: ``q_nope W_UK`` then the rotated ``q_pe``);
    ``cache`` ``[num_slots, D]`` float32 (one layer); ``block_tables`` ``[S, W]`` int32 whose
    entries are valid block ids of ``cache``; ``tok_seq``/``tok_nkeys`` ``[T]`` int32: each token's
    sequence row and how many keys it sees. Returns ``[T, H, rank]``, or with ``w_kv_b``
    (``kv_b_proj.weight``, ``[H * (nope + v_dim), rank]``) the per-head values ``[T, H, v_dim]``.
    """
    if not available():
        raise RuntimeError("the native paged MLA kernel is not available")
    for name, t, dt in (("q", q, torch.float32), ("cache", cache, torch.float32), ("block_tables", block_tables, torch.int32),
                        ("tok_seq", tok_seq, torch.int32), ("tok_nkeys", tok_nkeys, torch.int32)):
        _check(name, t, dt)
    n, h, d = q.shape
    if cache.shape[1] != d or block_tables.dim() != 2 or tok_seq.shape != (n,) or tok_nkeys.shape != (n,):
        raise ValueError("paged_mla: inconsistent shapes")
    if w_kv_b is not None:
        _check("w_kv_b", w_kv_b, torch.float32)
        if w_kv_b.numel() != h * (nope + v_dim) * rank:
            raise ValueError("paged_mla: w_kv_b does not match heads x (nope + v_dim) x rank")
        out = torch.empty(n, h, v_dim, dtype=torch.float32)
    else:
        out = torch.empty(n, h, rank, dtype=torch.float32)
    _lib.mi_paged_mla(q.data_ptr(), cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
                      tok_seq.data_ptr(), tok_nkeys.data_ptr(), n, h, d, rank, block_size, scale,
                      None if w_kv_b is None else w_kv_b.data_ptr(), nope, v_dim, out.data_ptr(),
                      torch.get_num_threads())
    return out


def mla_q_prolog(q: torch.Tensor, w_kv_b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rank: int,
                 v_dim: int, interleaved: bool) -> torch.Tensor:
    """Absorbed MLA queries ``[T, H, rank + rope]`` from ``q`` ``[T, H, nope + rope]``: ``q_nope W_UK``
    per head, then the rotated ``q_pe`` (``cos``/``sin`` ``[T, rope / 2]`` from RotaryEmbedding)."""
    for name, t in (("q", q), ("w_kv_b", w_kv_b), ("cos", cos), ("sin", sin)):
        _check(name, t, torch.float32)
    n, h, qk = q.shape
    rope = cos.shape[1] * 2
    nope = qk - rope
    if sin.shape != cos.shape or cos.shape[0] != n or w_kv_b.numel() != h * (nope + v_dim) * rank:
        raise ValueError("mla_q_prolog: inconsistent shapes")
    out = torch.empty(n, h, rank + rope, dtype=torch.float32)
    _lib.mi_mla_q_prolog(q.data_ptr(), w_kv_b.data_ptr(), cos.data_ptr(), sin.data_ptr(), n, h, nope, rope, v_dim,
                         rank, int(interleaved), out.data_ptr(), torch.get_num_threads())
    return out


def mla_kv_prolog(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  slots: torch.Tensor, cache: torch.Tensor, interleaved: bool) -> None:
    """Write each token's latent into ``cache`` (``[num_slots, rank + rope]``) at ``slots`` ``[T]``:
    RMSNorm of the compressed KV (``kv[:, :rank]``) and the rotated shared key (``kv[:, rank:]``)."""
    for name, t in (("kv", kv), ("norm_weight", norm_weight), ("cos", cos), ("sin", sin), ("cache", cache)):
        _check(name, t, torch.float32)
    _check("slots", slots, torch.int64)
    n, dim = kv.shape
    rank = norm_weight.shape[0]
    rope = dim - rank
    if cache.shape[1] != dim or cos.shape != (n, rope // 2) or sin.shape != cos.shape or slots.shape != (n,):
        raise ValueError("mla_kv_prolog: inconsistent shapes")
    if n and (int(slots.min()) < 0 or int(slots.max()) >= cache.shape[0]):
        raise ValueError("mla_kv_prolog: slot out of range")
    _lib.mi_mla_kv_prolog(kv.data_ptr(), norm_weight.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
                          slots.data_ptr(), n, rank, rope, int(interleaved), cache.data_ptr(), torch.get_num_threads())


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Routed experts of one MoE layer in one call (see ``moe.c``).

    ``x`` ``[T, H]``, ``topk_ids`` ``[T, k]`` int64 (each in ``[0, E)``), ``topk_weights`` ``[T, k]``,
    ``gate_up`` ``[E, 2I, H]``, ``down`` ``[E, H, I]``; all float32 contiguous CPU tensors except the ids.
    Returns ``[T, H]``.
    """
    if not available():
        raise RuntimeError("the native MoE kernel is not available")
    for name, t, dt in (("x", x, torch.float32), ("topk_ids", topk_ids, torch.int64),
                        ("topk_weights", topk_weights, torch.float32), ("gate_up", gate_up, torch.float32),
                        ("down", down, torch.float32)):
        _check(name, t, dt)
    n, hidden = x.shape
    e, two_i, h2 = gate_up.shape
    if h2 != hidden or down.shape != (e, hidden, two_i // 2) or topk_ids.shape != topk_weights.shape \
            or topk_ids.shape[0] != n:
        raise ValueError("moe_experts: inconsistent shapes")
    out = torch.empty(n, hidden, dtype=torch.float32)
    _lib.mi_moe_experts(x.data_ptr(), n, hidden, topk_ids.data_ptr(), topk_weights.data_ptr(), topk_ids.shape[1],
                        gate_up.data_ptr(), down.data_ptr(), e, two_i // 2, out.data_ptr(), torch.get_num_threads())
    return out


def _check(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for float32 ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (see ``linear.c``: for
    decode-sized M, where a BLAS call spends more on packing the weight than on arithmetic)."""
    if not available():
        raise RuntimeError("the native kernels are not available")
    _check("x", x, torch.float32)
    _check("weight", weight, torch.float32)
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"linear: x has {k} columns, weight {tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=torch.float32)
    _lib.mi_linear(x.data_ptr(), weight.data_ptr(), m, k, n, out.data_ptr(), torch.get_num_threads())
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of the first largest value of each row of a float32 ``[rows, n]`` tensor."""
    _check("x", x, torch.float32)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _lib.mi_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension of a float32 ``x``."""
    if not available():
        raise RuntimeError("the native kernels are not available")
    _check("x", x, torch.float32)
    _check("weight", weight, torch.float32)
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rmsnorm: weight of shape {tuple(weight.shape)} for rows of {n}")
    out = torch.empty_like(x)
    _lib.mi_rmsnorm(x.data_ptr(), weight.data_ptr(), x.numel() // max(n, 1), n, eps, out.data_ptr(),
                    torch.get_num_threads())
    return out


def v3_route(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
             norm: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (``noaux_tc``, sigmoid) from the gate's float32 logits ``[T, E]``:
    returns ``ids [T, top_k]`` int64 and ``weights [T, top_k]`` float32."""
    if not available():
        raise RuntimeError("the native kernels are not available")
    _check("logits", logits, torch.float32)
    _check("bias", bias, torch.float32)
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int64)
    weights = torch.empty(t, top_k, dtype=torch.float32)
    rc = _lib.mi_v3_route(logits.data_ptr(), bias.data_ptr(), t, e, n_group, topk_group, top_k, int(norm),
                          scaling, ids.data_ptr(), weights.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"v3_route: unsupported routing shape (experts {e}, groups {n_group}, "
                         f"topk_group {topk_group}, top_k {top_k})")
    return ids, weights
