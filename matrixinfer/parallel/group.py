"""The ranks of one expert-parallel instance over ``torch.distributed``: collectives with
timeouts that turn a dead rank into :class:`RankFailure`, the reused dispatch/combine buffers,
the control channel of DP attention, and the EP metrics.

Dispatch and combine start asynchronously (:meth:`EPGroup.start_all_to_all`, a :class:`Pending`
collective that progresses in the backend's threads) and are waited for later, so that with
``--microbatches 2`` (:mod:`.microbatch`) one microbatch computes while the other's collective is
in flight; :meth:`EPGroup.pause` is where a microbatch gives up its turn.

Ranks join the way PyTorch users start them (torchrun's environment: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). MoE collectives run on the default group (gloo on CPU, NCCL on
CUDA); the control messages (requests, outputs: msgspec bytes, never pickle) on a gloo group.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from matrixinfer.parallel.placement import ExpertPlacement

if TYPE_CHECKING:
    from matrixinfer.parallel.ep_moe import ExpertParallelExperts
    from matrixinfer.parallel.microbatch import TurnScheduler

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 20.0  # a collective that waits longer than this means a rank is gone
RENDEZVOUS_TIMEOUT_S = 600.0  # ranks meet once every rank has loaded its model
STORE_ENV = "MATRIXINFER_EP_STORE"


class RankFailure(RuntimeError):
    """A collective failed or timed out: a rank of the instance died or stopped answering. The
    instance cannot continue (the other ranks would wait for it in every MoE layer)."""


@dataclass
class Pending:
    """A collective in flight: its work handle, what it is (for errors), and the tensors it
    reads and writes (kept alive until :meth:`EPGroup.wait`)."""

    work: dist.Work
    what: str
    out: torch.Tensor
    inp: torch.Tensor


class RankEnv:
    """Where this rank is: torchrun's variables, or the values given."""

    def __init__(self, rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 store_path: str | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the instance's {world_size} ranks")
        self.rank, self.world_size, self.master_addr, self.master_port = rank, world_size, master_addr, master_port
        # ranks of one host meet through a file in a private directory instead of a TCP store (which
        # listens on every interface whatever master_addr says)
        self.store_path = store_path

    @classmethod
    def from_environ(cls) -> RankEnv:
        """From ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (all required), and
        ``MATRIXINFER_EP_STORE`` (a file store, set by the launcher for ranks of one host)."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"an EP rank needs torchrun's environment; {', '.join(missing)} not set")
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["MASTER_ADDR"],
                   int(os.environ["MASTER_PORT"]), os.environ.get(STORE_ENV) or None)


class EPGroup:
    """This rank's view of the instance: collectives, buffers, placement and metrics."""

    def __init__(self, env: RankEnv, placement: ExpertPlacement, dispatch_dtype: str = "fp32",
                 device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if placement.ep_size != env.world_size:
            raise ValueError(f"placement is for {placement.ep_size} ranks, the instance has {env.world_size}")
        self.rank, self.world = env.rank, env.world_size
        self.placement = placement
        self.dispatch_dtype = dispatch_dtype
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.rank_of, self.local_index = placement.tensors(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            # meeting takes as long as the slowest rank's model load; collectives then time out fast
            meet = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
            store: dist.Store
            if env.store_path is not None:
                store = dist.FileStore(env.store_path, env.world_size)
                store.set_timeout(meet)
            else:
                store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                                      timeout=meet)
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=meet)
        # the groups the instance runs on, with the short timeout (the default group's covers the meeting)
        self.pg = dist.new_group(backend=backend, timeout=timeout)
        self.ctrl = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else self.pg
        self.broken: str | None = None
        self._bufs: dict[str, torch.Tensor] = {}
        self.backends: list[ExpertParallelExperts] = []  # in layer order; enable_expert_parallel fills it
        self.turns: TurnScheduler | None = None  # with --microbatches 2 (enable_microbatches)
        # metrics
        self.passes = self.idle_passes = self.tokens = 0
        self.dispatch_bytes = self.combine_bytes = 0
        self.dispatch_s = self.combine_s = 0.0
        self.expert_tokens = torch.zeros(0, placement.n_experts, dtype=torch.long)
        self.rebalances = self.experts_received = 0  # placement switches and expert copies received in them

    # -- buffers -----------------------------------------------------------------------------
    def buffer(self, name: str, nbytes: int, device: torch.device | None = None) -> torch.Tensor:
        """A uint8 view of ``nbytes`` of the reused buffer ``name`` (grown, never shrunk); each
        microbatch has its own (one's may be in flight while the other fills its own)."""
        if self.turns is not None and self.turns.index:
            name = f"{name}@{self.turns.index}"
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2 * (buf.numel() if buf is not None else 0), 1024), dtype=torch.uint8,
                              device=device or self.device)
            self._bufs[name] = buf
        return buf[:nbytes]

    # -- collectives -------------------------------------------------------------------------
    def _check(self) -> None:
        if self.broken is not None:
            raise RankFailure(f"EP rank {self.rank}: the instance already failed ({self.broken})")

    def _failed(self, what: str, exc: BaseException) -> RankFailure:
        self.broken = f"{what}: {exc}"
        log.error("EP rank %d: %s failed: %s", self.rank, what, exc)
        return RankFailure(f"EP rank {self.rank} of {self.world}: {what} failed (a rank died or timed out "
                           f"after {self.timeout_s:.0f} s): {exc}")

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                   in_splits: Sequence[int], what: str) -> None:
        self._check()
        try:
            dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=self.pg)
        except RuntimeError as e:
            raise self._failed(what, e) from e

    def start_counts(self, send: torch.Tensor) -> Pending:
        """Start the split sizes step of a variable all-to-all (rows this rank sends to each rank);
        :meth:`wait_counts` gives the rows it receives from each."""
        self._check()
        recv = torch.empty_like(send)
        try:
            work = dist.all_to_all_single(recv, send, group=self.pg, async_op=True)
        except RuntimeError as e:
            raise self._failed("exchanging split sizes", e) from e
        assert work is not None  # async_op=True returns the work handle
        return Pending(work, "exchanging split sizes", recv, send)

    def wait_counts(self, pending: Pending) -> list[int]:
        self.wait(pending)
        return [int(n) for n in pending.out.tolist()]

    def start_all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                         in_splits: Sequence[int], what: str) -> Pending:
        """Start ``all_to_all_single`` into ``out``; the result is there after :meth:`wait`."""
        self._check()
        try:
            work = dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=self.pg, async_op=True)
        except RuntimeError as e:
            raise self._failed(what, e) from e
        assert work is not None
        return Pending(work, what, out, inp)

    def wait(self, pending: Pending) -> None:
        """Wait for a started collective (at most the group's timeout; a failure is the instance's)."""
        try:
            pending.work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise self._failed(pending.what, e) from e

    def pause(self) -> None:
        """Where a microbatch with a collective in flight gives the turn to the other microbatch
        (a no-op without ``--microbatches 2``)."""
        if self.turns is not None:
            self.turns.pause()

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Control channel: rank 0's ``data`` on every rank (length first, then the bytes)."""
        self._check()
        try:
            n = torch.tensor([len(data) if data is not None else 0], dtype=torch.long)
            dist.broadcast(n, 0, group=self.ctrl)
            if data:
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                buf = torch.empty(int(n), dtype=torch.uint8)
            if int(n):
                dist.broadcast(buf, 0, group=self.ctrl)
        except RuntimeError as e:
            raise self._failed("control broadcast", e) from e
        return buf.numpy().tobytes()

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Control channel: every rank's ``data``, on rank 0 (other ranks get ``[]``)."""
        self._check()
        try:
            sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.long), group=self.ctrl)
            width = max(1, max(int(s) for s in sizes))
            mine = torch.zeros(width, dtype=torch.uint8)
            if data:
                mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            parts = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(mine, parts, dst=0, group=self.ctrl)
        except RuntimeError as e:
            raise self._failed("control gather", e) from e
        if parts is None:
            return []
        return [p[:int(s)].numpy().tobytes() for p, s in zip(parts, sizes)]

    def slots_of(self, rank: int) -> list[int]:
        """The experts in ``rank``'s slots of the first MoE layer (its row of the placement table)."""
        if self.backends:
            return list(self.backends[0].placement.slots[rank])
        return self.placement.experts_of(rank)

    # -- lockstep ----------------------------------------------------------------------------
    @torch.inference_mode()
    def idle_pass(self) -> None:
        """An empty batch through every MoE layer: a rank with no work this step still takes its
        part in each layer's dispatch and combine."""
        self.idle_passes += 1
        if self.turns is not None:  # the other ranks run two microbatches: so does this one, both empty
            self.turns.run([self.empty_pass] * self.turns.n)
        else:
            self.empty_pass()

    def empty_pass(self) -> None:
        """This rank's part in every MoE layer's dispatch and combine, without tokens."""
        for b in self.backends:
            b.empty_forward()

    def close(self) -> None:
        if self.turns is not None:
            self.turns.close()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly
                log.debug("destroy_process_group failed", exc_info=True)

    # -- metrics -----------------------------------------------------------------------------
    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        if layer == 0 and (self.turns is None or not self.turns.index):  # a pass counts once, not per microbatch
            self.passes += 1
            self.tokens += topk_ids.shape[0]
        if self.expert_tokens.shape[0] <= layer:
            grown = torch.zeros(layer + 1, self.placement.n_experts, dtype=torch.long)
            grown[:self.expert_tokens.shape[0]] = self.expert_tokens
            self.expert_tokens = grown
        if topk_ids.numel():
            self.expert_tokens[layer] += torch.bincount(topk_ids.reshape(-1).cpu(),
                                                        minlength=self.placement.n_experts)

    def timed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
