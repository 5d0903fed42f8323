"""Operator cost models: time of one operator on one die from FLOPs, bytes and measured efficiency.

Pure functions. A die is the unit that runs one data-parallel rank (one die of an Ascend 910C
package; a whole GPU on NVIDIA). Times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from matrixinfer.sim.hardware import ChipSpec
from matrixinfer.sim.measurements import OperatorProfile, interpolate_a2a
from matrixinfer.sim.shapes import BF16, INT8

DISPATCH_SCALE_BYTES = 512  # the per-token scale, padded to 512 B in the dispatch message [paper §4]


@dataclass(frozen=True)
class Die:
    """Per-die peaks and the operator profile measured on that platform."""

    chip: ChipSpec
    profile: OperatorProfile

    @property
    def bf16(self) -> float:
        return self.chip.per_die(self.chip.bf16_flops)

    @property
    def lowp(self) -> float:
        return self.chip.per_die(self.chip.low_precision_flops)

    @property
    def hbm_bw(self) -> float:
        return self.chip.per_die(self.chip.hbm_bw)

    @property
    def hbm_bytes(self) -> float:
        return self.chip.per_die(self.chip.hbm_bytes)

    @property
    def stream_bw(self) -> float:
        """The HBM bandwidth kernels stream weights and KV at: the peak at the measured utilisation."""
        return self.hbm_bw * self.profile.mem_bw_util


def gemm_time(die: Die, tokens: float, params: float, weight_bytes: float = INT8,
              compute_share: float = 1.0) -> float:
    """A token-by-weight GEMM: the slower of compute at the measured GEMM utilisation and
    streaming the weights at the measured memory-bandwidth utilisation (roofline).

    ``compute_share`` is the fraction of the die's matrix cores the kernel runs on (a stream of
    the decode microbatch pipeline); the die's memory bandwidth stays available to it."""
    if tokens <= 0:
        return 0.0
    peak = die.lowp if weight_bytes == INT8 else die.bf16
    compute = 2.0 * tokens * params / (peak * die.profile.gemm_util * compute_share)
    memory = params * weight_bytes / die.stream_bw
    return max(compute, memory)


def attention_time(die: Die, flops: float, kv_bytes: float, compute_share: float = 1.0) -> float:
    """Fused attention: compute at the measured MLA compute utilisation (BF16) or KV streaming at
    the measured bandwidth utilisation, whichever is slower (``compute_share`` as in
    :func:`gemm_time`)."""
    compute = flops / (die.bf16 * die.profile.attn_compute_util * compute_share)
    memory = kv_bytes / die.stream_bw
    return max(compute, memory)


def dispatch_bytes_per_token(hidden: int, destinations: float) -> float:
    """INT8 dispatch payload: the hidden vector in INT8 plus its scale padded to
    :data:`DISPATCH_SCALE_BYTES`, once per destination (7.5 KB for a 7,168-wide token [paper §4])."""
    return destinations * (hidden * INT8 + DISPATCH_SCALE_BYTES)


def combine_bytes_per_token(hidden: int, destinations: float) -> float:
    """BF16 combine payload per token."""
    return destinations * hidden * BF16


def _a2a_time(die: Die, points, ep: int, tokens: float, recv_scale: float) -> float:
    """Low-latency all-to-all: measured latency split into a fixed part and a per-token part.

    The measurement at ``profile.a2a_tokens`` tokens moves ``latency x bandwidth`` bytes; the
    per-token share streams at the fabric's measured link rate, the remainder is fixed (flags,
    barrier, launch). ``recv_scale`` stretches the per-token part on the busiest receiver
    (expert load imbalance).
    """
    if tokens <= 0 or ep <= 1:
        return 0.0
    point = interpolate_a2a(points, ep)
    total_bytes = point.latency_s * point.bandwidth
    stream = total_bytes / die.profile.a2a_link_bw
    fixed = max(point.latency_s - stream, 0.0)
    per_token = stream / die.profile.a2a_tokens
    return fixed + tokens * per_token * recv_scale


def dispatch_time(die: Die, ep: int, tokens: float, recv_scale: float = 1.0) -> float:
    """FusedDispatch (INT8 tokens) of ``tokens`` tokens per rank at EP degree ``ep``."""
    return _a2a_time(die, die.profile.dispatch, ep, tokens, recv_scale)


def combine_time(die: Die, ep: int, tokens: float, recv_scale: float = 1.0) -> float:
    """FusedCombine (BF16 outputs) of ``tokens`` tokens per rank at EP degree ``ep``."""
    return _a2a_time(die, die.profile.combine, ep, tokens, recv_scale)


def a2a_bulk_time(die: Die, nbytes: float) -> float:
    """Throughput-mode (prefill) all-to-all of ``nbytes`` sent per rank."""
    return nbytes / die.profile.prefill_a2a_bw


def transfer_time(nbytes: float, bandwidth: float, latency: float = 0.0) -> float:
    """A plain transfer over a link of ``bandwidth`` B/s plus a fixed ``latency``."""
    if bandwidth <= 0:
        raise ValueError(f"transfer_time: bandwidth must be positive, got {bandwidth}")
    return latency + nbytes / bandwidth
