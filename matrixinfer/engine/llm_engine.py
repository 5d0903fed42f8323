"""The single-instance serving engine: continuous batching over a paged latent KV cache.

``step()`` asks the scheduling policy what to run, applies its decision to the block manager,
runs the model, samples, detokenizes, checks stop conditions and returns per-request deltas.
Everything here runs on one thread; :mod:`matrixinfer.engine.async_engine` puts it behind asyncio.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import msgspec
import torch

from matrixinfer.config import EngineConfig
from matrixinfer.engine.block_manager import BlockManager
from matrixinfer.engine.errors import RequestError
from matrixinfer.engine.kv_connector import KVConnector
from matrixinfer.engine.model_runner import ModelRunner
from matrixinfer.engine.outputs import EngineStats, FinishReason, RequestOutput
from matrixinfer.engine.sampler import Sampler, TopLogprobs
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.engine.scheduler import Budget, SeqView, schedule
from matrixinfer.engine.sequence import Sequence, SequenceStatus
from matrixinfer.engine.speculative import MTPSpeculator, keep, reset
from matrixinfer.engine.structured import Grammars
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.device import resolve_device, resolve_dtype
from matrixinfer.model.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)
MAX_FAILED_STEPS = 3  # failed steps in a row before step() raises (a broken engine, not a bad request)


class _Detok:
    """Per-request text state: incremental decoding and stop-string handling."""

    def __init__(self, tok: Tokenizer, stops: list[str]) -> None:
        self.dec = IncrementalDecoder(tok)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string appeared (the text is cut before it)."""
        before = len(self.text)
        self.text += self.dec.push(token)
        for s in self.stops:  # earlier text was searched already: only a match reaching the new text is new
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                self.text = self.text[:i]
                return True
        return False

    def delta(self, final: bool) -> str:
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out


class LLMEngine:
    """Continuous-batching engine for one model on one device.

    Everything runs on the caller's thread except the reservation methods (a decode instance's KV
    receivers write into reserved blocks from their own threads): those hold ``_kv_lock``.
    """

    def __init__(self, cfg: EngineConfig, model: DeepseekForCausalLM | None = None, tokenizer: Tokenizer | None = None,
                 connector: KVConnector | None = None) -> None:
        from matrixinfer.model.default_model import default_model_path
        from matrixinfer.model.loader import load_model

        self.cfg = cfg
        path = Path(cfg.model) if cfg.model else default_model_path()
        self.model_path = path
        self.model_id = cfg.served_model_name or path.name
        dev = resolve_device(cfg.device)
        self.model = model if model is not None else load_model(path, dtype=resolve_dtype(cfg.dtype, dev), device=dev)
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(path)
        self.runner = ModelRunner(self.model, cfg, dev)
        mc = self.model.config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        # a lone sequence must always fit in the cache, or it could never run
        self.max_seq_len = min(self.max_model_len, self.runner.num_blocks * cfg.block_size)
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.cache_namespace or self.model_id)
        self.budget = Budget(cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.block_size)
        self.eos_ids = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.sampler = Sampler(Grammars(lambda: self.tokenizer.to_json(), mc.vocab_size, sorted(self.eos_ids)))
        self.spec = MTPSpeculator(cfg, self.runner, self.sampler, self.max_seq_len, self.blocks.num_free) \
            if cfg.speculative == "mtp" else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self._detok: dict[str, _Detok] = {}
        self.prompt_tokens = self.generation_tokens = self.preemptions = self.steps = 0
        self.busy_seconds = 0.0
        self.busy_cpu_seconds = 0.0  # this thread's CPU time in steps (the rest of busy_seconds it waited)
        self.external_hit_tokens = 0
        self.connector = connector
        if connector is not None:
            connector.bind(self.runner.kv_cache, self.sampler)
        # decode side of PDC: blocks held for KV arriving from a prefill instance
        self._kv_lock = threading.Lock()
        self._reservations: dict[str, tuple[Sequence, float]] = {}
        self.kv_received_bytes = 0
        self.failed_steps = 0  # in a row; MAX_FAILED_STEPS of them mean the engine itself is broken
        self._timed: tuple[int, int] | None = None  # (batch, drafts) of a decode-only step, for the policy
        # what a step costs the policy: on the CPU this thread's CPU time (other processes on the
        # cores swing wall time 2-3x between a run's trials, and steps at different depths are timed
        # at different moments), on a GPU wall time (sampling synchronizes every step)
        self._step_clock = time.thread_time if self.runner.device.type == "cpu" else time.perf_counter

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises RequestError for prompts the model cannot take."""
        if request_id in self.seqs or self.has_reservation(request_id):
            raise RequestError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_ids)
        seq = Sequence(request_id, list(prompt_ids), params)
        self.seqs[request_id] = seq
        self._detok[request_id] = _Detok(self.tokenizer, params.stop)
        self.waiting.append(seq)

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context allows at most "
                               f"{self.max_seq_len - 1} prompt tokens (max_model_len {self.max_model_len})")

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if it is unknown or done."""
        if self.release_reservation(request_id):
            return True
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, FinishReason.ABORT)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: per-request deltas. A failure while processing one request fails that
        request alone (an output with ``error``); one that no request can be blamed for (the forward
        pass) fails the running batch; only ``MAX_FAILED_STEPS`` failed steps in a row raise."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        self._timed = None
        cost_start = self._step_clock() if self.spec is not None else 0.0
        try:
            outputs = self._step()
        except Exception as exc:
            self.failed_steps += 1
            if self.failed_steps >= MAX_FAILED_STEPS:
                raise
            log.exception("engine step failed; failing the %d running request(s)", len(self.running))
            return [self._fail(seq, exc) for seq in list(self.running)]
        finally:
            self.busy_seconds += time.perf_counter() - start
            self.busy_cpu_seconds += time.thread_time() - cpu_start
        self.failed_steps = 0
        if self.spec is not None:  # the policy learns step costs from use
            self.spec.observe_step(self._timed, self._step_clock() - cost_start)
        return outputs

    def _step(self) -> list[RequestOutput]:
        if not self.has_work():
            return []
        self.steps += 1
        waiting_views, cached = [], {}
        for seq in list(self.waiting)[: self.cfg.max_num_seqs]:
            hit, revive = self.blocks.lookup(seq) if self.cfg.enable_prefix_caching else ([], 0)
            cached[seq.request_id] = hit
            ext = self._num_external_blocks(seq, len(hit))
            waiting_views.append(SeqView(seq.request_id, seq.num_tokens, (len(hit) + ext) * self.cfg.block_size,
                                         len(hit), 0, revive))
        # Blocks a preemption would free are needed only when the running sequences could want
        # more blocks than are free (an upper bound: every remaining token this step).
        bs = self.cfg.block_size
        look = self.spec.lookahead(self.running) if self.spec is not None else {}  # drafts to verify
        short = sum(max(0, -(-(s.num_tokens + look.get(s.request_id, 0)) // bs) - len(s.block_table))
                    for s in self.running) > self.blocks.num_free
        running_views = [SeqView(s.request_id, s.num_tokens, s.num_computed, len(s.block_table),
                                 self.blocks.freeable(s) if short else 0, lookahead=look.get(s.request_id, 0))
                         for s in self.running]
        plan = schedule(running_views, waiting_views, self.blocks.num_free, self.budget)
        for sid in plan.preempted:
            seq = self.seqs[sid]
            self.running.remove(seq)
            self.blocks.free(seq)
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(seq)
        for sid in plan.admitted:
            seq = self.seqs[sid]
            self.waiting.remove(seq)
            self.blocks.admit(seq, cached[sid])
            self._load_external(seq)
            reset(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        chunks = []
        for seq in self.running:
            n = plan.chunks.get(seq.request_id)
            if n:
                self.blocks.reserve(seq, seq.num_computed + n)
                chunks.append((seq, n))
        if not chunks:
            return []
        drafts = self.spec.propose(chunks, look) if look and self.spec is not None else {}
        if self.spec is not None and self.spec.batch == len(chunks) == len(self.running) and not plan.admitted:
            self._timed = (len(chunks), max(map(len, drafts.values()), default=0))  # a decode-only step
        if drafts:
            return self._step_speculative(chunks, drafts)
        logits, samplers = self.runner.execute(chunks)
        if self.spec is not None:  # MTP entries of prompt chunks, hidden states kept for later drafts
            self.spec.keep_plain(chunks, self.runner.hidden)
        for seq, n in chunks:
            if seq.num_computed < len(seq.prompt_ids):
                self.prompt_tokens += min(n, len(seq.prompt_ids) - seq.num_computed)
            seq.num_computed += n
            if self.cfg.enable_prefix_caching:
                self.blocks.commit(seq)
            if self.connector is not None:
                self.connector.save(seq, self.blocks.block_hashes(seq, seq.num_computed // bs))
        if logits is None:
            return []
        return self._sample_and_append(logits, samplers)

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[RequestOutput]:
        """Sample and append a token per sequence; a sequence whose sampling or bookkeeping raises
        fails alone (after a failed batch the rows are sampled one by one to find it)."""
        ids, params = [s.request_id for s in seqs], [s.params for s in seqs]
        hist = [(s.prompt_ids, s.output_ids) for s in seqs] if any(p.needs_history for p in params) else None
        rows: list[tuple[int, float | None, TopLogprobs] | Exception]
        try:
            top: list[TopLogprobs] = []
            tokens, logprobs = self.sampler(logits, ids, params, hist, top)
            rows = [(tokens[i], logprobs[i] if logprobs else None, top[i] if top else []) for i in range(len(seqs))]
        except Exception:
            rows = []
            for i in range(len(seqs)):
                try:
                    top = []
                    token, lp = self.sampler(logits[i:i + 1], ids[i:i + 1], params[i:i + 1],
                                             hist[i:i + 1] if hist else None, top)
                    rows.append((token[0], lp[0] if lp else None, top[0] if top else []))
                except Exception as exc:
                    rows.append(exc)
        outputs = []
        for seq, row in zip(seqs, rows):
            try:
                if isinstance(row, Exception):
                    raise row
                outputs.append(self._append(seq, *row))
            except Exception as exc:
                outputs.append(self._fail(seq, exc))
        return outputs

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """End ``seq`` because processing it raised ``exc``, freeing what it holds."""
        rid = seq.request_id
        log.error("request %s failed: %r", rid, exc, exc_info=exc)
        if seq in self.running:
            self.running.remove(seq)
        self.seqs.pop(rid, None)
        if seq.status != SequenceStatus.FINISHED:
            try:
                self._finish(seq, FinishReason.ABORT)
            except Exception:  # noqa: BLE001 - still free the blocks below
                log.exception("cleaning up failed request %s", rid)
        self.blocks.free(seq)
        self._detok.pop(rid, None)
        return RequestOutput(request_id=rid, finished=True, finish_reason=FinishReason.ABORT,
                             num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
                             error=f"processing the request failed: {exc!r}")

    def _append(self, seq: Sequence, token: int, logprob: float | None, top: TopLogprobs | None = None
                ) -> RequestOutput:
        p = seq.params
        seq.output_ids.append(token)
        if p.logprobs and logprob is not None:
            seq.logprobs.append(logprob)
        tops = [top] if p.top_logprobs and top is not None else []
        seq.top_logprobs.extend(tops)
        self.generation_tokens += 1
        n_out = len(seq.output_ids)
        reason = None
        stop_hit = self._detok[seq.request_id].push(token)
        stops = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids or stop_hit
        if stops and n_out >= p.min_tokens:
            reason = FinishReason.STOP
        if reason is None and (n_out >= p.max_tokens or seq.num_tokens >= self.max_seq_len):
            reason = FinishReason.LENGTH
        out = RequestOutput(request_id=seq.request_id, token_ids=[token],
                            logprobs=[logprob] if p.logprobs and logprob is not None else [], top_logprobs=tops,
                            num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=n_out,
                            num_cached_tokens=seq.num_cached_tokens)
        if reason is None and n_out == 1 and self.connector is not None \
                and self.connector.take_over(seq, token, logprob):  # reads the KV before the blocks are freed
            out.text = self._detok[seq.request_id].delta(final=False)
            self.running.remove(seq)
            self.seqs.pop(seq.request_id, None)
            self._finish(seq, FinishReason.HANDOFF)
            out.handed_off = True
            return out
        if reason is not None:
            self.running.remove(seq)
            self.seqs.pop(seq.request_id, None)
            out.text = self._finish(seq, reason)
            out.finished, out.finish_reason = True, reason
        else:
            out.text = self._detok[seq.request_id].delta(final=False)
        return out

    def _step_speculative(self, chunks: list[tuple[Sequence, int]],
                          drafts: dict[str, list[int]]) -> list[RequestOutput]:
        """A step that verifies MTP drafts (engine/speculative.py): one main pass over the drafts
        (and any prompt chunks), the prompt chunks' MTP entries, verification, rollback of rejected
        drafts. As in :meth:`_sample_and_append`, a sequence whose verification or bookkeeping
        raises fails alone."""
        assert self.spec is not None
        fused = self.spec.verify_fused(chunks, drafts, len(self.running))
        emitted: dict[str, tuple[list[int], list[float] | None, list[TopLogprobs]] | Exception]
        if fused is not None:  # greedy, every chunk verifying: the next drafts are made already
            hidden, starts, tokens = fused
            emitted = {rid: (toks, None, []) for rid, toks in tokens.items()}
        else:
            rows: list[int] = []
            samplers: list[Sequence] = []
            first = 0
            for seq, n in chunks:
                d = drafts.get(seq.request_id, [])
                if seq.num_computed + n - len(d) == seq.num_tokens:
                    rows.extend(range(first + n - len(d) - 1, first + n))
                    samplers.append(seq)
                first += n
            hidden, starts, logits = self.runner.run(chunks, drafts, rows)
            self.spec.fill_prompt(chunks, hidden, starts)
            emitted = self._verify(logits, samplers, drafts) if logits is not None else {}
        self.spec.steps += bool(drafts)
        outputs: list[RequestOutput] = []
        for (seq, n), first in zip(chunks, starts):
            out = emitted.get(seq.request_id)
            try:
                if isinstance(out, Exception):
                    raise out
                done = self.spec.advance(seq, n, drafts.get(seq.request_id, []), out[0] if out else None, hidden,
                                         first)
                if seq.num_computed < len(seq.prompt_ids):
                    self.prompt_tokens += min(done, len(seq.prompt_ids) - seq.num_computed)
                seq.num_computed += done
                if done < n:  # roll back the rejected drafts: blocks that held only them go back to the pool
                    self.blocks.truncate(seq, seq.num_computed)
                self._name_known_blocks(seq)
                if out is not None:
                    outputs.append(self._append_tokens(seq, *out))
            except Exception as exc:  # one request's verification or bookkeeping fails it alone
                outputs.append(self._fail(seq, exc))
        if fused is not None:
            self.spec.store_ahead(chunks)
            return outputs
        # the next step's first drafts, on this pass's metadata
        self.spec.draft_ahead([(seq, first) for (seq, _), first in zip(chunks, starts) if seq.request_id in drafts],
                              hidden, len(self.running))
        return outputs

    def _verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: dict[str, list[int]]
                ) -> dict[str, tuple[list[int], list[float] | None, list[TopLogprobs]] | Exception]:
        """Each sequence's emitted tokens (and log-probabilities), or the exception verifying it
        raised: after a failed batch the sequences are verified one by one to find the culprit."""
        ids = [s.request_id for s in seqs]
        params = [s.params for s in seqs]
        ds = [drafts.get(i, []) for i in ids]
        hist = [(s.prompt_ids, s.output_ids) for s in seqs] if any(p.needs_history for p in params) else None
        try:
            top: list[list[TopLogprobs]] = []
            tokens, logprobs = self.sampler.verify(logits, ids, params, ds, hist, top)
            return {i: (t, logprobs[j] if logprobs else None, top[j] if top else [])
                    for j, (i, t) in enumerate(zip(ids, tokens))}
        except Exception:  # noqa: BLE001 - found and reported per sequence below
            pass
        out: dict[str, tuple[list[int], list[float] | None, list[TopLogprobs]] | Exception] = {}
        first = 0
        for j, i in enumerate(ids):
            rows = logits[first:first + len(ds[j]) + 1]
            first += len(ds[j]) + 1
            try:
                top = []
                t, lp = self.sampler.verify(rows, [i], [params[j]], [ds[j]], hist[j:j + 1] if hist else None, top)
                out[i] = (t[0], lp[0] if lp else None, top[0] if top else [])
            except Exception as exc:
                out[i] = exc
        return out

    def _name_known_blocks(self, seq: Sequence) -> None:
        """Commit and offer the full blocks whose tokens are known: accepted drafts are computed
        before they are appended, so a step's last ones are named when the next step (or the
        request's end, :meth:`_finish`) knows them."""
        known = min(seq.num_computed, seq.num_tokens)
        if self.cfg.enable_prefix_caching:
            self.blocks.commit(seq, known)
        if self.connector is not None:
            self.connector.save(seq, self.blocks.block_hashes(seq, known // self.cfg.block_size))

    def _append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list[float] | None,
                       top: list[TopLogprobs]) -> RequestOutput:
        """:meth:`_append` for each of a step's tokens up to the first that ends the request (the
        rest are dropped, never emitted), as one output."""
        out = self._append(seq, tokens[0], logprobs[0] if logprobs else None, top[0] if top else None)
        for i in range(1, len(tokens)):
            if out.finished or out.handed_off:
                break
            more = self._append(seq, tokens[i], logprobs[i] if logprobs else None, top[i] if top else None)
            more.token_ids = out.token_ids + more.token_ids
            more.logprobs = out.logprobs + more.logprobs
            more.top_logprobs = out.top_logprobs + more.top_logprobs
            more.text = out.text + more.text
            out = more
        return out

    def _finish(self, seq: Sequence, reason: FinishReason) -> str:
        if self.spec is not None and reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._name_known_blocks(seq)  # the last step's accepted drafts are appended by now
        if self.connector is not None:
            self.connector.request_finished(seq)
        self.blocks.free(seq)
        self.sampler.forget(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        detok = self._detok.pop(seq.request_id, None)
        return detok.delta(final=True) if detok and reason != FinishReason.ABORT else ""

    # -- external KV (connector) ---------------------------------------------------------------
    def _num_external_blocks(self, seq: Sequence, local_blocks: int) -> int:
        """Blocks past the local hit that the connector could load (at least one token is left to compute)."""
        if self.connector is None:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.cfg.block_size
        if max_blocks <= local_blocks:
            return 0
        return self.connector.num_external_blocks(seq, self.blocks.block_hashes(seq, max_blocks)[local_blocks:])

    def _load_external(self, seq: Sequence) -> None:
        local = len(seq.block_table)
        ext = self._num_external_blocks(seq, local)
        if not ext or self.connector is None:
            return
        bs = self.cfg.block_size
        self.blocks.reserve(seq, (local + ext) * bs)
        hashes = self.blocks.block_hashes(seq, local + ext)[local:]
        loaded = self.connector.after_alloc(seq, hashes, seq.block_table[local:local + ext])
        seq.num_computed = (local + loaded) * bs
        seq.num_cached_tokens = seq.num_computed
        self.external_hit_tokens += loaded * bs

    # -- decode side of disaggregation -----------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int, timeout: float) -> list[int] | None:
        """Hold blocks for ``num_tokens`` tokens of KV arriving from a prefill instance; None if they
        do not fit now. Unclaimed reservations are reclaimed by :meth:`reap_reservations` after
        ``timeout`` seconds."""
        with self._kv_lock:
            if request_id in self._reservations or request_id in self.seqs:
                raise RequestError(f"request id {request_id!r} is already in use")
            need = self.blocks.blocks_needed(num_tokens + 1)
            if need > self.blocks.num_free:
                return None
            holder = Sequence(request_id, [], SamplingParams(max_tokens=1))
            self.blocks.reserve(holder, num_tokens + 1)
            self._reservations[request_id] = (holder, time.monotonic() + timeout)
            return list(holder.block_table)

    def has_reservation(self, request_id: str) -> bool:
        with self._kv_lock:
            return request_id in self._reservations

    def write_reserved(self, request_id: str, layer_start: int, kv: torch.Tensor) -> bool:
        """Write ``kv`` ``[layers, tokens, dim]`` into ``request_id``'s reserved blocks (from a KV
        receiver thread); False when the reservation is gone (aborted or expired: drop the bytes)."""
        with self._kv_lock:
            held = self._reservations.get(request_id)
            if held is None:
                return False
            self.runner.kv_cache.write_tokens(held[0].block_table, kv, layer_start)
            self.kv_received_bytes += kv.numel() * kv.element_size()
            return True

    def release_reservation(self, request_id: str) -> bool:
        """Free a reservation's blocks; False if there is none."""
        with self._kv_lock:
            held = self._reservations.pop(request_id, None)
            if held is not None:
                self.blocks.free(held[0])
            return held is not None

    def reap_reservations(self) -> list[str]:
        """Free reservations past their deadline; returns their request ids."""
        now = time.monotonic()
        with self._kv_lock:
            expired = [rid for rid, (_, deadline) in self._reservations.items() if deadline < now]
        for rid in expired:
            self.release_reservation(rid)
        return expired

    def attach(self, request_id: str, prompt_ids: list[int], first_token: int, first_logprob: float | None,
               params: SamplingParams, num_cached: int = 0, hidden: bytes = b"") -> RequestOutput:
        """Turn a filled reservation into a running sequence whose first token is already known;
        returns that first token's output (text included) for the client. ``hidden``: the main
        model's float32 hidden state at the last prompt position, from which an engine with MTP
        speculation drafts the next tokens (:func:`matrixinfer.engine.speculative.last_hidden`)."""
        width = self.model.config.hidden_size * 4
        if hidden and len(hidden) != width:
            raise RequestError(f"request {request_id!r}: the handed-over hidden state has {len(hidden)} bytes; "
                               f"this model's is {width} (hidden_size {width // 4} float32)")
        with self._kv_lock:
            held = self._reservations.pop(request_id, None)
        if held is None:
            raise RequestError(f"request {request_id!r} holds no reservation (aborted or expired)")
        seq = Sequence(request_id, list(prompt_ids), params)
        seq.block_table = held[0].block_table
        seq.num_computed = len(prompt_ids)
        seq.num_cached_tokens = num_cached
        seq.output_ids = [first_token]
        if params.logprobs and first_logprob is not None:
            seq.logprobs = [first_logprob]
        seq.status = SequenceStatus.RUNNING
        if hidden and self.spec is not None:  # the last prompt position's MTP row gives the first draft
            h = torch.frombuffer(bytearray(hidden), dtype=torch.float32).view(1, -1)
            reset(seq, seq.num_computed - 1)
            keep(seq, h.to(self.runner.device, self.runner.kv_cache.dtype), 0, 1)
        else:
            reset(seq)
        detok = _Detok(self.tokenizer, params.stop)
        detok.push(first_token)
        self._detok[request_id] = detok
        self.seqs[request_id] = seq
        self.running.append(seq)  # the first token was generated and counted by the prefill instance
        return RequestOutput(request_id=request_id, token_ids=[first_token], logprobs=list(seq.logprobs),
                             text=detok.delta(final=False), num_prompt_tokens=len(prompt_ids), num_output_tokens=1,
                             num_cached_tokens=num_cached)

    # -- conveniences ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._kv_lock:
            reserved = sum(len(s.block_table) for s, _ in self._reservations.values())
        queued = sum(s.num_tokens - s.num_computed for s in self.waiting) + \
            sum(s.num_tokens - s.num_computed for s in self.running)
        stats = EngineStats(
            queued_tokens=queued, running=len(self.running), waiting=len(self.waiting),
            kv_total=self.blocks.num_blocks, kv_used=self.blocks.num_used, reserved_blocks=reserved,
            prefix_queried_tokens=self.blocks.queried_tokens, prefix_hit_tokens=self.blocks.hit_tokens,
            external_hit_tokens=self.external_hit_tokens, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, preemptions=self.preemptions, steps=self.steps,
            busy_seconds=self.busy_seconds, busy_cpu_seconds=self.busy_cpu_seconds,
            kv_received_bytes=self.kv_received_bytes)
        if self.spec is not None:
            s = self.spec
            stats = msgspec.structs.replace(stats, spec_steps=s.steps, spec_verifications=s.verifications,
                                            spec_draft_tokens=s.drafted, spec_accepted_tokens=s.accepted)
        if self.connector is not None:
            stats = msgspec.structs.replace(stats, **self.connector.stats())
        return stats

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run ``prompts`` to completion (offline use and tests); returns generated token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {i: [] for i in ids}
        for rid, p, sp in zip(ids, prompts, plist):
            self.add_request(rid, p, sp)
        pending = set(ids)
        while pending:
            for out in self.step():
                results[out.request_id].extend(out.token_ids)
                if out.finished:
                    pending.discard(out.request_id)
        return [results[i] for i in ids]
