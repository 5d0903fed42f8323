"""Two-microbatch overlap (``--microbatches 2``): a forward pass of an EP rank is split into two
microbatches that take turns, so that while one microbatch's dispatch or combine is in flight the
other computes its attention and experts (the reference design's two-microbatch pipeline; the
simulator models it in :mod:`matrixinfer.sim.decode` and :mod:`matrixinfer.sim.prefill`).

Each microbatch runs the model's ordinary forward (every backend and kernel as without overlap)
in a thread of its own, but only one of them runs at a time: :class:`TurnScheduler` passes the
turn at :meth:`TurnScheduler.pause`, which the expert-parallel backend calls right after it has
started an asynchronous collective (:mod:`.ep_moe`). The collective progresses in the
communication backend's own threads while the other microbatch computes. Because the turns
alternate in a fixed order, every rank starts its collectives in the same order (microbatch 0's
split sizes, microbatch 1's, 0's dispatch, 1's, ...), as ``torch.distributed`` requires.

Every forward pass of every rank is two microbatches, an empty one where a rank has one token or
none, so that the ranks' collectives pair up whatever their batches. :func:`split_batch` (pure)
cuts the flat batch between whole sequences where one boundary is near enough to half its tokens
(:func:`cut_point`), else at half its tokens, inside a sequence: the second part of a cut prefill
chunk attends to the first part's keys, which that microbatch wrote to the paged cache in the same
layer one turn earlier (microbatch 0 always reaches a layer's attention first). A cut inside a
sequence costs compute the whole batch does not: the second part expands the first part's latents
to per-head keys again, in every layer (``benchmarks/ep_overlap.py`` measures it).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from matrixinfer.model.attention import AttentionMetadata, KVCache


class MicrobatchAborted(RuntimeError):
    """The other microbatch of this forward pass failed; this one stops at its next turn."""


class TurnScheduler:
    """Runs functions as microbatches that take turns: the caller's thread runs the first, one
    persistent worker thread per further microbatch the rest; exactly one runs at any time and
    the turn passes, in a fixed round-robin order, at :meth:`pause` or when a microbatch ends.

    A turn is handed over through plain locks, one per microbatch, held while it waits (a
    release wakes the waiter straight from C; no queue or event per run). A hand-over costs one
    thread wake-up, 20-40 us on a loaded 2-core machine (``benchmarks/ep_overlap.py`` measures
    it), and a forward pass hands over 2 x 2 times per MoE layer: about 0.5 ms of a ~100 ms
    decode step of the demo model at EP 2, too little to be worth spinning for (a spinning
    waiter would hold the GIL against the microbatch that computes)."""

    #: False: :meth:`pause` keeps the turn, so microbatch 0 runs to its end before microbatch 1
    #: starts (the same cut and collectives without the overlap: the control of an ablation)
    overlap = True

    def __init__(self, n: int = 2) -> None:
        if n < 2:
            raise ValueError(f"a turn scheduler needs at least 2 microbatches, got {n}")
        self.n = n
        self._local = threading.local()
        # _turn[i] is held while microbatch i waits for its turn; releasing it gives i the turn.
        # Microbatch 0's lock also wakes run() when the last microbatch ends.
        self._turn = [threading.Lock() for _ in range(n)]
        for lock in self._turn:
            lock.acquire()
        self._jobs: list[Callable[[], None] | None] = [None] * n
        self._finished = [True] * n
        self._failed = False
        self._closed = False
        self._wait_end = False  # whether microbatch 0 ended before another (run() then waits for the last)
        self.runs = self.switches = 0  # forward passes run as microbatches, and turns handed over
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._serve, args=(i,), name=f"microbatch-{i}", daemon=True)
                         for i in range(1, n)]
        for t in self._workers:
            t.start()

    @property
    def index(self) -> int:
        """The microbatch the calling thread runs (0 outside :meth:`run`)."""
        return getattr(self._local, "index", 0)

    @property
    def active(self) -> bool:
        """Whether the calling thread runs a microbatch of a :meth:`run` in progress."""
        return getattr(self._local, "active", False)

    def run(self, fns: list[Callable[[], Any]]) -> list[Any]:
        """Run ``fns[i]`` as microbatch i (``len(fns) == n``), in turns; their results in order.
        The first error raised by a microbatch is raised here once all have stopped."""
        if len(fns) != self.n:
            raise ValueError(f"{len(fns)} microbatches for a scheduler of {self.n}")
        if self.active:
            raise RuntimeError("TurnScheduler.run is not reentrant (a microbatch started microbatches)")
        if self._closed:
            raise RuntimeError("this TurnScheduler is closed")
        self.runs += 1
        results: list[Any] = [None] * self.n
        errors: list[BaseException | None] = [None] * self.n
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        self._finished = [False] * self.n
        self._failed = False
        for i in range(1, self.n):  # each worker picks its job up when it first gets the turn
            self._jobs[i] = self._job(i, fns[i], results, errors, grad, inference)
        self._job(0, fns[0], results, errors, grad, inference)()
        if self._wait_end:
            self._turn[0].acquire()  # the last microbatch to end hands the turn back here
        first = next((e for e in errors if e is not None and not isinstance(e, MicrobatchAborted)), None)
        if first is None:
            first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    def pause(self) -> None:
        """Give the turn to the next unfinished microbatch and wait for it to come back (a no-op
        outside :meth:`run`, or when every other microbatch has finished)."""
        if not self.active or not self.overlap:
            return
        me = self.index
        nxt = self._next(me)
        if nxt == me:
            return
        self.switches += 1
        self._turn[nxt].release()
        self._turn[me].acquire()
        if self._failed:
            raise MicrobatchAborted(f"microbatch {me}: the other microbatch of this forward pass failed")

    def close(self) -> None:
        """Stop the worker threads (between runs)."""
        self._closed = True
        self._jobs = [None] * self.n
        for i in range(1, self.n):
            self._turn[i].release()

    # -- internals ---------------------------------------------------------------------------
    def _next(self, me: int) -> int:
        with self._lock:
            for k in range(1, self.n + 1):
                j = (me + k) % self.n
                if not self._finished[j]:
                    return j
        return me

    def _job(self, i: int, fn: Callable[[], Any], results: list[Any], errors: list[BaseException | None],
             grad: bool, inference: bool) -> Callable[[], None]:
        def job() -> None:
            self._local.index, self._local.active = i, True
            try:
                if i and self._failed:  # an earlier microbatch failed before it first gave up the turn
                    raise MicrobatchAborted(f"microbatch {i}: the other microbatch of this forward pass failed")
                # grad and inference mode are per thread: the worker takes the caller's
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    results[i] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to run(), which raises it
                errors[i] = e
                if not isinstance(e, MicrobatchAborted):
                    self._failed = True
            finally:
                self._local.active = False
                with self._lock:
                    self._finished[i] = True
                    last = all(self._finished)
                if i == 0:
                    self._wait_end = not last
                nxt = self._next(i)
                if nxt != i:
                    self._turn[nxt].release()
                elif last and i:
                    self._turn[0].release()  # run() waits for the last one
        return job

    def _serve(self, i: int) -> None:
        while True:
            self._turn[i].acquire()  # microbatch i starts when i - 1 first gives up the turn
            job = self._jobs[i]
            if job is None:
                return
            self._jobs[i] = None
            job()


@dataclass(frozen=True)
class MicrobatchSplit:
    """Where a flat batch is cut: tokens ``[0, tokens)`` are microbatch 0, the rest microbatch 1,
    each with its own attention metadata."""

    tokens: int
    first: AttentionMetadata
    second: AttentionMetadata


#: a cut between whole sequences is taken when the smaller microbatch keeps at least this share
#: of the tokens; a more uneven one would leave the larger microbatch's compute unhidden
MIN_SHARE = 3 / 8


def cut_point(query_lens: list[int]) -> int:
    """Where to cut a batch of sequences with ``query_lens`` new tokens (tokens before the cut
    are microbatch 0): the sequence boundary nearest half the tokens when each side keeps at
    least :data:`MIN_SHARE` of them (no sequence is cut: the cut costs no compute), else half the
    tokens (inside a sequence). A decode batch is cut at half its sequences."""
    total = sum(query_lens)
    half = total // 2
    best, start = 0, 0
    for q in query_lens[:-1]:
        start += q
        if abs(start - half) < abs(best - half):
            best = start
    if best and min(best, total - best) >= MIN_SHARE * total:
        return best
    return half


def split_batch(meta: AttentionMetadata) -> MicrobatchSplit | None:
    """Cut a paged batch in two at :func:`cut_point`; a sequence straddling the cut gives its
    first new tokens to microbatch 0 and the rest, which see them as cached context, to
    microbatch 1. None where the batch cannot be cut (fewer than 2 tokens, or metadata without a
    paged cache)."""
    total = meta.num_tokens
    if total < 2 or not meta.paged or meta.slot_mapping is None or meta.block_tables is None:
        return None
    assert meta.tok_seq is not None and meta.tok_nkeys is not None  # paged metadata has them
    cut = cut_point(meta.query_lens)
    start, s = 0, 0
    while start + meta.query_lens[s] <= cut:  # s: the sequence holding token `cut`
        start += meta.query_lens[s]
        s += 1
    head = cut - start  # tokens of sequence s before the cut
    q, c = meta.query_lens, meta.context_lens
    if head:
        first_q, first_c = q[:s] + [head], c[:s] + [c[s] - (q[s] - head)]
        second_q, second_c = [q[s] - head] + q[s + 1:], c[s:]
        first_rows = s + 1
    else:
        first_q, first_c, second_q, second_c, first_rows = q[:s], c[:s], q[s:], c[s:], s
    first = AttentionMetadata(first_q, first_c, meta.slot_mapping[:cut], meta.mode,
                              block_tables=meta.block_tables[:first_rows], block_size=meta.block_size,
                              tok_seq=meta.tok_seq[:cut], tok_nkeys=meta.tok_nkeys[:cut])
    second = AttentionMetadata(second_q, second_c, meta.slot_mapping[cut:], meta.mode,
                               block_tables=meta.block_tables[s:], block_size=meta.block_size,
                               tok_seq=meta.tok_seq[cut:] - s, tok_nkeys=meta.tok_nkeys[cut:])
    return MicrobatchSplit(cut, first, second)


class MicrobatchForward:
    """The forward of a model under ``--microbatches 2``: the batch as two microbatches taking
    turns (:func:`split_batch`; an empty pass through the MoE layers' collectives for a
    microbatch without tokens). Installed as the model instance's ``forward`` by
    :func:`enable_microbatches`; the model's own forward computes each microbatch."""

    def __init__(self, model: nn.Module, scheduler: TurnScheduler, empty_pass: Callable[[], None]) -> None:
        self._model = weakref.ref(model)  # the model holds this object: no reference cycle
        self._forward = type(model).forward
        self.scheduler = scheduler
        self.empty_pass = empty_pass

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_cache: KVCache | None = None) -> torch.Tensor:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this microbatched forward is gone")
        fwd = self._forward
        split = split_batch(meta) if meta.num_tokens == input_ids.shape[0] else None
        if split is None:
            whole = self.scheduler.run([lambda: fwd(model, input_ids, positions, meta, kv_cache), self.empty_pass])
            return whole[0]
        n = split.tokens
        a, b = self.scheduler.run([
            lambda: fwd(model, input_ids[:n], positions[:n], split.first, kv_cache),
            lambda: fwd(model, input_ids[n:], positions[n:], split.second, kv_cache)])
        return torch.cat([a, b])
