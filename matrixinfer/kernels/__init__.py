"""Native CPU kernels, compiled on first use with the system C compiler and called through ctypes.

The kernels are optional: without a C compiler (or with ``MATRIXINFER_KERNELS=0``) the model's
modules keep their PyTorch implementations, which compute the same thing more slowly; which one
runs is decided once, when a model is loaded (:func:`matrixinfer.model.backend.select_backend`).
``matrixinfer.h`` declares every exported function and struct; the bindings are generated from it
(:class:`matrixinfer.native_build.NativeLibrary`). A built library is cached under
``$MATRIXINFER_CACHE/kernels`` (default ``~/.cache/matrixinfer``), keyed by the sources, the
compiler flags and the CPU, so a shared home directory never runs code built for another CPU.

The wrappers here check dtypes, devices, contiguity and shapes (a wrong pointer would read or
write out of bounds) and raise ``ValueError`` naming the tensor; :mod:`.layer` describes whole
decoder layers for the one-call decode path.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch

from matrixinfer import envs
from matrixinfer.native_build import NativeLibrary

_HERE = Path(__file__).parent


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


LIBRARY = NativeLibrary(
    "matrixinfer-kernels", "kernels", sorted(_HERE.glob("*.c")), _HERE / "matrixinfer.h",
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11",
     "-Werror=missing-prototypes"],
    libs=["-lm", "-lmvec"], depends=sorted(_HERE.glob("*.h")), key_extra=_cpu_id,
    enabled=envs.kernels_enabled, fallback="using the PyTorch paths (slower on CPU)")


def available() -> bool:
    """Whether the native kernels can be used (built on the first call if needed; never raises).
    ``MATRIXINFER_KERNELS=0`` at that first call turns them off for the process."""
    return LIBRARY.load() is not None


def _lib() -> ctypes.CDLL:
    lib = LIBRARY.load()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (no C compiler, a failed build, "
                           "or MATRIXINFER_KERNELS=0)")
    return lib


def _check(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}")


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
    lib = _lib()
    for name, t, dt in (("q", q, torch.float32), ("cache", cache, torch.float32),
                        ("block_tables", block_tables, torch.int32), ("tok_seq", tok_seq, torch.int32),
                        ("tok_nkeys", tok_nkeys, torch.int32)):
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
    lib.mi_paged_mla(q.data_ptr(), cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
                     tok_seq.data_ptr(), tok_nkeys.data_ptr(), n, h, d, rank, block_size, scale,
                     None if w_kv_b is None else w_kv_b.data_ptr(), nope, v_dim, out.data_ptr(),
                     torch.get_num_threads())
    return out


def mla_q_prolog(q: torch.Tensor, w_kv_b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rank: int,
                 v_dim: int, interleaved: bool) -> torch.Tensor:
    """Absorbed MLA queries ``[T, H, rank + rope]`` from ``q`` ``[T, H, nope + rope]``: ``q_nope W_UK``
    per head, then the rotated ``q_pe`` (``cos``/``sin`` ``[T, rope / 2]`` from RotaryEmbedding)."""
    lib = _lib()
    for name, t in (("q", q), ("w_kv_b", w_kv_b), ("cos", cos), ("sin", sin)):
        _check(name, t, torch.float32)
    n, h, qk = q.shape
    rope = cos.shape[1] * 2
    nope = qk - rope
    if sin.shape != cos.shape or cos.shape[0] != n or w_kv_b.numel() != h * (nope + v_dim) * rank:
        raise ValueError("mla_q_prolog: inconsistent shapes")
    out = torch.empty(n, h, rank + rope, dtype=torch.float32)
    lib.mi_mla_q_prolog(q.data_ptr(), w_kv_b.data_ptr(), cos.data_ptr(), sin.data_ptr(), n, h, nope, rope, v_dim,
                        rank, int(interleaved), out.data_ptr(), torch.get_num_threads())
    return out


def mla_kv_prolog(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  slots: torch.Tensor, cache: torch.Tensor, interleaved: bool) -> None:
    """Write each token's latent into ``cache`` (``[num_slots, rank + rope]``) at ``slots`` ``[T]``:
    RMSNorm of the compressed KV (``kv[:, :rank]``) and the rotated shared key (``kv[:, rank:]``)."""
    lib = _lib()
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
    lib.mi_mla_kv_prolog(kv.data_ptr(), norm_weight.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
                         slots.data_ptr(), n, rank, rope, int(interleaved), cache.data_ptr(), torch.get_num_threads())


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Routed experts of one MoE layer in one call (see ``moe.c``).

    ``x`` ``[T, H]``, ``topk_ids`` ``[T, k]`` int64 (each in ``[0, E)``), ``topk_weights`` ``[T, k]``,
    ``gate_up`` ``[E, 2I, H]``, ``down`` ``[E, H, I]``; all float32 contiguous CPU tensors except the ids.
    Returns ``[T, H]``.
    """
    lib = _lib()
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
    rc = lib.mi_moe_experts(x.data_ptr(), n, hidden, topk_ids.data_ptr(), topk_weights.data_ptr(), topk_ids.shape[1],
                            gate_up.data_ptr(), down.data_ptr(), e, two_i // 2, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("moe_experts: out of memory")
    return out


def _optional(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> int | None:
    """The address of an optional float32 operand (None for NULL), checked against ``shape``."""
    if t is None:
        return None
    _check(name, t, torch.float32)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    return t.data_ptr()


def quantize_rows(x: torch.Tensor, mul: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8 of float32 ``x`` ``[M, K]`` (times ``mul`` ``[K]`` first): ``q`` int8 and
    ``scale`` ``[M]``; the native twin of :func:`matrixinfer.quant.int8.quantize_rows`."""
    lib = _lib()
    _check("x", x, torch.float32)
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    scale = torch.empty(m, dtype=torch.float32)
    lib.mi_quantize_rows(x.data_ptr(), m, k, _optional("mul", mul, (k,)), q.data_ptr(), scale.data_ptr())
    return q, scale


class LinearW8A8:
    """``x W^T (+ bias)`` through ``mi_linear_w8a8`` with the weight operands checked once, here:
    a call checks only ``x``. ``weight`` int8 ``[N, K]``, ``weight_scale`` float32 with ``N``
    elements, optional float32 ``bias`` ``[N]`` and ``pre_scale`` ``[K]`` (multiplied into ``x``
    before its per-row quantization). It keeps references to the operands (their memory lives as
    long as it does); a module rebuilds it when it replaces one (``Int8Linear``)."""

    __slots__ = ("weight", "weight_scale", "bias", "pre_scale", "k", "n")

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 pre_scale: torch.Tensor | None = None) -> None:
        _lib()
        _check("weight", weight, torch.int8)
        _check("weight_scale", weight_scale, torch.float32)
        if weight.dim() != 2 or weight_scale.numel() != weight.shape[0]:
            raise ValueError(f"linear_w8a8: weight {tuple(weight.shape)} with weight_scale "
                             f"{tuple(weight_scale.shape)}: expected [N, K] and N scales")
        self.n, self.k = weight.shape
        _optional("bias", bias, (self.n,))
        _optional("pre_scale", pre_scale, (self.k,))
        self.weight, self.weight_scale, self.bias, self.pre_scale = weight, weight_scale, bias, pre_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or not x.is_cpu or x.dim() != 2:
            raise ValueError(f"x must be a 2-D CPU torch.float32 tensor, got {x.dtype} {tuple(x.shape)} on {x.device}")
        m, k = x.shape
        if k != self.k:
            raise ValueError(f"linear_w8a8: x has {k} columns, weight {tuple(self.weight.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty(m, self.n, dtype=torch.float32)
        b, p = self.bias, self.pre_scale
        rc = _lib().mi_linear_w8a8(x.data_ptr(), m, k, None if p is None else p.data_ptr(), self.weight.data_ptr(),
                                   self.weight_scale.data_ptr(), None if b is None else b.data_ptr(), self.n,
                                   out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError("linear_w8a8: out of memory")
        return out


def linear_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                pre_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ bias)`` with ``W = weight * weight_scale`` (int8 ``[N, K]``, float32 ``[N]`` or
    ``[N, 1]``) and ``x`` ``[M, K]`` float32 quantized per row on entry, after multiplying by
    ``pre_scale`` ``[K]`` (see ``linear_w8a8.c``: for decode-sized M). Checks every operand; a
    module calling with the same weights each time holds a :class:`LinearW8A8` instead."""
    _check("x", x, torch.float32)
    _check("weight", weight, torch.int8)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_w8a8: x has {x.shape[-1]} columns, weight {tuple(weight.shape)}, "
                         f"weight_scale {tuple(weight_scale.shape)}")
    return LinearW8A8(weight, weight_scale, bias, pre_scale)(x)


def moe_experts_w8a8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                     gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor,
                     gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                     gate_up_pre: torch.Tensor | None = None, down_pre: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts of one MoE layer with INT8 weights and activations in one call (``moe_w8a8.c``).

    ``x`` ``[T, H]`` float32; ``topk_ids``/``topk_weights`` ``[T, k]`` (int64, float32);
    ``gate_up`` ``[E, 2I, H]`` and ``down`` ``[E, H, I]`` int8 with scales of ``E x 2I`` and
    ``E x H`` elements; optional float32 biases ``[E, 2I]`` / ``[E, H]`` and smoothing vectors
    ``[E, H]`` / ``[E, I]``. Returns ``[T, H]``.
    """
    lib = _lib()
    for name, t, dt in (("x", x, torch.float32), ("topk_ids", topk_ids, torch.int64),
                        ("topk_weights", topk_weights, torch.float32), ("gate_up", gate_up, torch.int8),
                        ("gate_up_scale", gate_up_scale, torch.float32), ("down", down, torch.int8),
                        ("down_scale", down_scale, torch.float32)):
        _check(name, t, dt)
    n, hidden = x.shape
    e, two_i, h2 = gate_up.shape
    inter = two_i // 2
    if h2 != hidden or down.shape != (e, hidden, inter) or gate_up_scale.numel() != e * two_i \
            or down_scale.numel() != e * hidden or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != n:
        raise ValueError("moe_experts_w8a8: inconsistent shapes")
    if n and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= e):
        raise ValueError(f"moe_experts_w8a8: an expert id outside [0, {e})")
    out = torch.empty(n, hidden, dtype=torch.float32)
    rc = lib.mi_moe_experts_w8a8(
        x.data_ptr(), n, hidden, topk_ids.data_ptr(), topk_weights.data_ptr(), topk_ids.shape[1], gate_up.data_ptr(),
        gate_up_scale.data_ptr(), _optional("gate_up_bias", gate_up_bias, (e, two_i)),
        _optional("gate_up_pre", gate_up_pre, (e, hidden)), down.data_ptr(), down_scale.data_ptr(),
        _optional("down_bias", down_bias, (e, hidden)), _optional("down_pre", down_pre, (e, inter)), e, inter,
        out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("moe_experts_w8a8: out of memory")
    return out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for float32 ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (see ``linear.c``: for
    decode-sized M, where a BLAS call spends more on packing the weight than on arithmetic)."""
    lib = _lib()
    _check("x", x, torch.float32)
    _check("weight", weight, torch.float32)
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"linear: x has {k} columns, weight {tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=torch.float32)
    lib.mi_linear(x.data_ptr(), weight.data_ptr(), m, k, n, out.data_ptr(), torch.get_num_threads())
    return out


def bind_team(cpus: list[int], threads: int) -> None:
    """Pin the calling thread's OpenMP team of ``threads`` threads to ``cpus`` (thread ``i`` to
    ``cpus[i % len(cpus)]``; ``mi_bind_team``). The team is the one every later parallel region of
    this thread reuses while its size stays ``threads``."""
    if not cpus:
        raise ValueError("bind_team: no CPUs given")
    ids = torch.tensor(cpus, dtype=torch.int64)
    if _lib().mi_bind_team(ids.data_ptr(), len(cpus), threads) != 0:
        raise OSError(f"could not pin the OpenMP threads to CPUs {cpus}")


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of the first largest value of each row of a float32 ``[rows, n]`` tensor."""
    lib = _lib()
    _check("x", x, torch.float32)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.mi_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension of a float32 ``x``."""
    lib = _lib()
    _check("x", x, torch.float32)
    _check("weight", weight, torch.float32)
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rmsnorm: weight of shape {tuple(weight.shape)} for rows of {n}")
    out = torch.empty_like(x)
    lib.mi_rmsnorm(x.data_ptr(), weight.data_ptr(), x.numel() // max(n, 1), n, eps, out.data_ptr(),
                   torch.get_num_threads())
    return out


def v3_route(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
             norm: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (``noaux_tc``, sigmoid) from the gate's float32 logits ``[T, E]``:
    returns ``ids [T, top_k]`` int64 and ``weights [T, top_k]`` float32."""
    lib = _lib()
    _check("logits", logits, torch.float32)
    _check("bias", bias, torch.float32)
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int64)
    weights = torch.empty(t, top_k, dtype=torch.float32)
    rc = lib.mi_v3_route(logits.data_ptr(), bias.data_ptr(), t, e, n_group, topk_group, top_k, int(norm),
                         scaling, ids.data_ptr(), weights.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"v3_route: unsupported routing shape (experts {e}, groups {n_group}, "
                         f"topk_group {topk_group}, top_k {top_k})")
    return ids, weights
