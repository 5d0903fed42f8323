"""What dispatch and combine move, as bytes (pure functions, no I/O).

A dispatched row is one token going to one destination rank (a token whose top-k experts live on
d ranks is sent d times, once per rank, as DeepEP and the simulator's
:func:`matrixinfer.sim.operators.dispatch_bytes_per_token` count it). Its bytes:

``[hidden vector in the dispatch dtype][fp32 scale: int8 only][top-k local expert ids, int32][top-k weights, fp32]``

The ids and weights of experts held by other ranks are ``-1`` and ``0``. INT8 is per-token
symmetric (``scale = max|x| / 127``), the paper's INT8 dispatch; the combine returns one row per
dispatched row in the model's dtype (the paper's BF16 combine on BF16 models).
"""

from __future__ import annotations

import torch

#: ``--dispatch-dtype`` values and the bytes of one hidden element in each
DISPATCH_DTYPES: dict[str, int] = {"fp32": 4, "bf16": 2, "int8": 1}
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
SCALE_BYTES = 4  # the per-token fp32 scale of INT8 rows
ROUTE_BYTES = 8  # per top-k slot: an int32 local expert id and an fp32 weight


def check_dispatch_dtype(name: str) -> str:
    if name not in DISPATCH_DTYPES:
        raise ValueError(f"dispatch dtype {name!r} is not supported: expected one of {', '.join(DISPATCH_DTYPES)}")
    return name


def payload_bytes(hidden: int, dispatch_dtype: str) -> int:
    """Bytes of one token's hidden vector on the wire, with its scale for INT8."""
    return hidden * DISPATCH_DTYPES[check_dispatch_dtype(dispatch_dtype)] + (SCALE_BYTES if dispatch_dtype == "int8"
                                                                             else 0)


def row_bytes(hidden: int, top_k: int, dispatch_dtype: str) -> int:
    """Bytes of one dispatched row: the payload plus the routing of its top-k slots."""
    return payload_bytes(hidden, dispatch_dtype) + top_k * ROUTE_BYTES


def dispatch_bytes_per_token(hidden: int, destinations: float, dispatch_dtype: str = "int8", top_k: int = 0) -> float:
    """Dispatch bytes of one token sent to ``destinations`` ranks (the simulator's name and
    meaning; ``top_k`` > 0 adds the routing this runtime sends with each row)."""
    return destinations * row_bytes(hidden, top_k, dispatch_dtype)


def combine_bytes_per_token(hidden: int, destinations: float, element_bytes: int = 2) -> float:
    """Combine bytes of one token: a ``hidden`` row from each of its ``destinations`` ranks."""
    return destinations * hidden * element_bytes


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: ``(q [R, H] int8, scale [R, 1] fp32)`` with ``x ~= q * scale``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def encode_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, dispatch_dtype: str,
                out: torch.Tensor) -> torch.Tensor:
    """Write rows ``x [R, H]`` with their local expert ``ids [R, k]`` and ``weights [R, k]`` into
    ``out`` (uint8 ``[R, row_bytes]``, e.g. a view of a reused buffer) and return it."""
    parts: list[torch.Tensor] = []
    if dispatch_dtype == "int8":
        q, scale = quantize_per_token(x)
        parts += [q.view(torch.uint8), scale.view(torch.uint8)]
    else:
        parts.append(x.to(_TORCH[check_dispatch_dtype(dispatch_dtype)]).contiguous().view(torch.uint8))
    parts += [ids.to(torch.int32).contiguous().view(torch.uint8), weights.float().contiguous().view(torch.uint8)]
    return torch.cat(parts, dim=1, out=out)


def decode_rows(buf: torch.Tensor, hidden: int, top_k: int, dispatch_dtype: str,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_rows`: ``(x [R, H] in dtype, ids [R, k] int64, weights [R, k] fp32)``."""
    p = payload_bytes(hidden, dispatch_dtype)
    if dispatch_dtype == "int8":
        q = buf[:, :hidden].contiguous().view(torch.int8)
        scale = buf[:, hidden:p].contiguous().view(torch.float32)
        x = (q.float() * scale).to(dtype)
    else:
        x = buf[:, :p].contiguous().view(_TORCH[dispatch_dtype]).to(dtype)
    ids = buf[:, p:p + 4 * top_k].contiguous().view(torch.int32).long()
    weights = buf[:, p + 4 * top_k:].contiguous().view(torch.float32)
    return x, ids, weights
