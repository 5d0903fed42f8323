"""MTP speculative decoding: drafts from the checkpoint's multi-token-prediction module, verified by
the main model in one pass over the paged cache (DeepSeek-V3's MTP as a draft model, docs/reference-design.md §4).

The MTP module at position ``i`` combines the main model's hidden state ``h_i`` with the embedding
of token ``i + 1`` and predicts token ``i + 2``; its block has its own layer in the paged cache,
whose entry at ``i`` is valid once ``h_i`` and token ``i + 1`` are known. A sequence keeps the
hidden states of the positions whose MTP entry is still missing (``Sequence.mtp_pending``; the
last computed position always, since the token after it is the one just sampled).

One speculative step of a decoding sequence with ``c`` tokens computed:

1. *Draft* (:meth:`MTPSpeculator.propose`): the MTP module runs its pending rows (catching up the
   positions the previous step verified, the last one being ``c - 1`` with token ``c``); the last
   row's MTP logits give draft ``d1`` for position ``c + 1``. Drafts ``d2..dK`` reuse the MTP module
   recursively on its own hidden state (those cache entries are provisional: the next catch-up
   rewrites them).
2. *Verify* (the engine's main pass, :meth:`ModelRunner.forward`): tokens ``[t_c, d1..dK]`` at
   positions ``c..c+K``, query length ``K + 1``; :meth:`Sampler.verify` keeps the longest accepted
   prefix plus one token from the target distribution.
3. *Roll back*: ``num_computed`` advances by the accepted count plus one; the rejected positions'
   latents are left behind as garbage past ``num_computed`` (never attended, overwritten next step)
   and blocks that held only them are released (:meth:`BlockManager.truncate`).
4. *Draft ahead* (:meth:`MTPSpeculator.draft_ahead`, where the draft step runs in one native call
   and the policy would speculate again): step 1's catch-up and the next step's drafts, as many as
   the policy would verify now, run in one call right after verification, over the verified hidden
   states (its first ``accepted + 1`` rows per sequence, a view at batch 1); the drafts wait in
   ``Sequence.mtp_draft`` and are dropped if the sequence's pending states change. The one-call
   draft step's inputs come from :class:`~matrixinfer.engine.step_inputs.StepInputs` (Python
   integers into reused buffers). Catch-up rows other than a sequence's last only write their
   latent into the MTP layer's cache: their attention output and MoE were never used.

Prompt chunks fill their MTP entries in the step that computes them (:meth:`fill_prompt`), so
prefix-cache and EMS blocks and a prefill instance's handoff carry them; a P/D prefill instance
hands over the last prompt position's hidden state (:func:`last_hidden`) and the decode instance
drafts from it. Steps the policy (:mod:`matrixinfer.engine.spec_policy`) runs without speculation
only keep their hidden states (at most :data:`PENDING_CAP` per sequence; older MTP entries are then
left stale, which can only lower acceptance, never change an output).
"""

from __future__ import annotations

import logging
import random
import time
from typing import cast

import torch

from matrixinfer import kernels
from matrixinfer.config import EngineConfig
from matrixinfer.engine.model_runner import ModelRunner
from matrixinfer.engine.sampler import Sampler
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.engine.sequence import Sequence
from matrixinfer.engine.spec_policy import AcceptanceTracker, SpecPolicy
from matrixinfer.engine.step_costs import StepCosts
from matrixinfer.engine.step_inputs import StepInputs
from matrixinfer.kernels.layer import MTPDraft
from matrixinfer.model.deepseek import Block, MTPLayer
from matrixinfer.model.layers import Linear

log = logging.getLogger(__name__)

INT8_DRAFT_HEAD = True  # the one-call CPU draft step projects with an INT8 copy of the head (see MTPDraft)
INT8_DRAFT_BLOCK = True  # ... and runs the MTP block and eh_proj from INT8 copies of their projections
FUSED_STEP = True  # greedy verification and the next drafts in one native call where they can (verify_fused)
PENDING_CAP = 64  # hidden states a sequence keeps through steps that do not speculate
CALIBRATION_CONTEXT = 128  # tokens of context of the sequences timed at start-up
CALIBRATION_ROUNDS = (6, 40)  # rounds of step timings per batch size at start-up: at least, at most (0.25 s)
_GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30, ignore_eos=True)


def reset(seq: Sequence, start: int | None = None) -> None:
    """Forget ``seq``'s pending hidden states (admission, recompute after preemption): positions
    before ``start`` (default: every computed one) have their MTP entries."""
    seq.mtp_start = seq.num_computed if start is None else start
    seq.mtp_count = 0
    seq.mtp_pending = []
    seq.mtp_draft = None


def keep(seq: Sequence, hidden: torch.Tensor, first: int, end: int) -> None:
    """Append rows ``first:end`` of ``hidden`` (the positions just computed) to ``seq``'s pending
    states, dropping the oldest beyond :data:`PENDING_CAP`."""
    if end <= first:
        return
    seq.mtp_draft = None  # drafted for the position before these rows
    if hidden.shape[0] > 4 * PENDING_CAP:  # a prefill step's hidden states: keep a copy of the rows, not all
        hidden, first, end = hidden[first:end].clone(), 0, end - first
    seq.mtp_pending.append((hidden, first, end))
    seq.mtp_count += end - first
    over = seq.mtp_count - PENDING_CAP
    while over > 0:
        h, a, b = seq.mtp_pending[0]
        drop = min(over, b - a)
        seq.mtp_start += drop
        seq.mtp_count -= drop
        over -= drop
        if drop == b - a:
            seq.mtp_pending.pop(0)
        else:
            seq.mtp_pending[0] = (h, a + drop, b)


def last_hidden(seq: Sequence) -> bytes:
    """The main model's hidden state at ``seq``'s last computed position as float32 bytes (what a
    prefill instance hands over for the first draft), or empty when it is not kept."""
    if not seq.mtp_pending or seq.mtp_start + seq.mtp_count != seq.num_computed:
        return b""
    h, _, end = seq.mtp_pending[-1]
    return h[end - 1].detach().float().cpu().numpy().tobytes()


def _pending_rows(seq: Sequence) -> torch.Tensor:
    parts = [h[a:b] for h, a, b in seq.mtp_pending]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class MTPSpeculator:
    """Drafting, bookkeeping and the per-step decision of one engine's MTP speculation."""

    def __init__(self, cfg: EngineConfig, runner: ModelRunner, sampler: Sampler, max_seq_len: int,
                 free_blocks: int) -> None:
        model = runner.model
        if not len(model.mtp):
            raise ValueError(f"--speculative mtp needs a checkpoint with an MTP module; {cfg.model or 'the model'} "
                             f"has none loaded (its config.json declares num_nextn_predict_layers = "
                             f"{model.config.num_nextn_predict_layers})")
        model.share_mtp_weights()
        self.k = cfg.num_speculative_tokens
        self.runner = runner
        self.sampler = sampler
        self.max_seq_len = max_seq_len
        self.steps = self.verifications = self.drafted = self.accepted = 0
        self.batch = 0  # decoding sequences the policy decided for this step (0: it was not asked)
        self.past_limit = False  # this step has more running sequences than any that may speculate
        self._prev_depth = -1  # drafts of the last timed step (see observe_step)
        self.tracker = AcceptanceTracker(self.k)
        self._fused: MTPDraft | None = None
        self._fused_key: tuple[object, ...] | None = None
        self._inputs: StepInputs | None = None
        self._ahead: tuple[torch.Tensor, list[int], int] | None = None  # verify_fused's drafts, for store_ahead
        self._mtp_parts: tuple[MTPLayer, Block, tuple[torch.nn.Module, ...]] | None = None
        costs = None
        if cfg.speculative_max_batch is None:
            costs = self.measure_costs(min(cfg.max_num_seqs, 256), free_blocks)
        self.policy = SpecPolicy(self.k, self.tracker, costs, cfg.speculative_max_batch)
        if costs is not None:
            log.info("MTP speculation (K=%d): measured step costs %s; speculating up to batch %d at the prior "
                     "acceptance", self.k, costs, self.policy.break_even_batch(cfg.max_num_seqs))

    # -- the step --------------------------------------------------------------------------------
    def lookahead(self, running: list[Sequence]) -> dict[str, int]:
        """Drafts each decoding sequence would verify this step ({} when the policy says no). A step
        of more running sequences than any that may speculate (:attr:`SpecPolicy.limit`) skips the
        policy and the per-sequence work: such a step costs what it does without speculation."""
        self.batch = 0
        limit = self.policy.limit
        self.past_limit = limit is not None and len(running) > limit
        if not running or self.past_limit:
            return {}
        decoding = [s for s in running if s.num_computed == s.num_tokens - 1]
        self.batch = len(decoding)
        drafts = self.policy.decide(len(decoding)) if decoding else 0
        if not drafts:
            return {}
        out = {}
        for s in decoding:
            # never draft past max_tokens or the context: the step emits at most k + 1 tokens
            k = min(drafts, s.params.max_tokens - len(s.output_ids) - 1, self.max_seq_len - s.num_tokens)
            if k > 0 and (s.mtp_pending or s.mtp_draft is not None):
                out[s.request_id] = k
        return out

    def observe_step(self, timed: tuple[int, int] | None, seconds: float) -> None:
        """After each engine step: the measured time of a decode-only step of ``batch`` sequences
        with ``depth`` drafts (0: plain), ``timed = (batch, depth)`` (None: another kind of step),
        for the policy's cost model, where the step before ran the same depth. The first step
        after a change runs on caches the other depth filled (demo model, batch 1, loaded: plain
        steps after speculative ones took 2.41 ms for the first, 2.12-2.36 ms for the next five;
        and a policy that counted lone plain steps put them at 2.08 ms where the plain engine's
        took ~1.45 ms, so it went on speculating in a run where always speculating gained
        nothing), and the first to draft after plain steps also catches up the MTP rows they left
        pending (up to :data:`PENDING_CAP` per sequence; 5.5 ms against 4.7 ms)."""
        prev, self._prev_depth = self._prev_depth, (timed[1] if timed is not None else -1)
        if timed is not None and prev == timed[1]:
            self.policy.observe(timed[0], timed[1], seconds)

    def propose(self, chunks: list[tuple[Sequence, int]], lookahead: dict[str, int]) -> dict[str, list[int]]:
        """Draft tokens for each chunk of a sequence in ``lookahead`` that the scheduler granted more
        than one token (``n - 1`` drafts): the first from the previous step's draft-ahead
        (:meth:`draft_ahead`) or the MTP catch-up rows, then recursive drafts."""
        want = [(seq, n - 1) for seq, n in chunks if n > 1 and seq.request_id in lookahead]
        if not want:
            return {}
        if all(seq.mtp_draft is not None and len(seq.mtp_draft) >= k for seq, k in want):  # all drafted ahead
            stored: dict[str, list[int]] = {}
            for seq, k in want:
                assert seq.mtp_draft is not None
                stored[seq.request_id] = [tok for tok, _ in seq.mtp_draft[:k]]
                seq.mtp_draft = None
            return stored
        rows = []
        for seq, _ in want:
            if seq.mtp_draft is None:
                c = seq.num_computed
                rows.append((seq, seq.mtp_start, seq.token_ids(seq.mtp_start + 1, c - seq.mtp_start),
                             _pending_rows(seq)))
                reset(seq)
        if len(rows) == len(want):  # nothing drafted ahead
            hidden, tokens = self._draft(rows)
        else:
            hidden, tokens = self._first_drafts(want, rows)
        drafts: dict[str, list[int]] = {seq.request_id: [] for seq, _ in want}
        live = list(range(len(want)))
        for depth in range(max(k for _, k in want)):
            if tokens is None:
                tokens = _argmax(self.runner.logits(hidden, mtp=True))
            for i, tok in zip(live, tokens):
                drafts[want[i][0].request_id].append(tok)
            keep_rows = [j for j, i in enumerate(live) if want[i][1] > depth + 1]
            if not keep_rows:
                break
            live = [live[j] for j in keep_rows]
            h = hidden if len(keep_rows) == hidden.shape[0] else hidden[torch.tensor(keep_rows, device=hidden.device)]
            # position c + depth: the previous draft as the next token, the MTP state as its hidden state
            rows = [(want[i][0], want[i][0].num_computed + depth, [drafts[want[i][0].request_id][-1]], h[j:j + 1])
                    for j, i in enumerate(live)]
            hidden, tokens = self._draft(rows)
        return drafts

    def _first_drafts(self, want: list[tuple[Sequence, int]], rows: list[tuple[Sequence, int, list[int], torch.Tensor]]
                      ) -> tuple[torch.Tensor, list[int]]:
        """Depth 1 of :meth:`propose` where some sequences drafted ahead: theirs as stored, the
        others' from their catch-up ``rows``, in ``want``'s order."""
        caught: dict[str, tuple[int, torch.Tensor]] = {}
        if rows:
            h, toks = self._draft(rows)
            if toks is None:
                toks = _argmax(self.runner.logits(h, mtp=True))
            caught = {r[0].request_id: (t, h[j:j + 1]) for j, (r, t) in enumerate(zip(rows, toks))}
        firsts = []
        for seq, _ in want:
            first = seq.mtp_draft[0] if seq.mtp_draft is not None else caught[seq.request_id]
            seq.mtp_draft = None
            firsts.append(first)
        states = [h for _, h in firsts]
        return (states[0] if len(states) == 1 else torch.cat(states)), [t for t, _ in firsts]

    def verify_fused(self, chunks: list[tuple[Sequence, int]], drafts: dict[str, list[int]], batch: int
                     ) -> tuple[torch.Tensor, list[int], dict[str, list[int]]] | None:
        """A greedy step's verification and the next step's drafts in one native call
        (:meth:`ModelRunner.speculate`), or None where it does not apply: every chunk must be a
        decoding sequence's last token and its drafts, every request greedy with logits nothing
        changes (no penalties, biases, grammar) and no log-probabilities, and the draft step and the
        main step must have their one-call paths. Returns the hidden states, each chunk's first row
        and each sequence's emitted tokens (its accepted drafts, then the main model's token after
        them: what :meth:`Sampler.verify` returns for such a batch); the drafts made for the next
        step, ``policy.ahead(batch)`` deep, wait for :meth:`store_ahead`.

        At batch 1 with two drafts on the demo model, the separate verification, acceptance and
        draft-ahead calls cost ~0.5 ms of Python and metadata per step besides their arithmetic
        (a fifth of the step), most of it from the interpreter's and torch's working set, which the
        weights each step streams push out of the caches."""
        self._ahead = None
        if not FUSED_STEP:
            return None
        for seq, n in chunks:
            d, p = drafts.get(seq.request_id), seq.params
            if d is None or len(d) + 1 != n or seq.num_computed + 1 != seq.num_tokens or p.temperature != 0.0 \
                    or p.processed or p.structured is not None or p.logprobs:
                return None
        fused = self._fused_draft()
        if fused is None:
            return None
        found = self.runner.speculate(chunks, drafts, fused, self.policy.ahead(batch))
        if found is None:
            return None
        hidden, starts, target, accepted, states, tokens, depth = found
        emitted = {seq.request_id: target[first:first + a + 1] for (seq, _), first, a in zip(chunks, starts, accepted)}
        self._ahead = (states, tokens, depth)
        return hidden, starts, emitted

    def store_ahead(self, chunks: list[tuple[Sequence, int]]) -> None:
        """After :meth:`verify_fused` and the engine's bookkeeping (:meth:`advance`): each sequence
        still running takes its drafts for the next step, its MTP entries caught up to
        ``num_computed`` (as :meth:`_draft_ahead` leaves it)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or not ahead[2]:
            return
        states, tokens, _ = ahead
        k = len(chunks)
        for j, (seq, _) in enumerate(chunks):
            if not seq.finished:
                reset(seq)
                seq.mtp_draft = [(tokens[i], states[i:i + 1]) for i in range(j, len(tokens), k)]

    def draft_ahead(self, verified: list[tuple[Sequence, int]], hidden: torch.Tensor, batch: int) -> None:
        """:meth:`_draft_ahead` when the policy would speculate at ``batch`` decoding sequences;
        a failure leaves the sequences to :meth:`propose` (a draft is an optimisation, never an
        output)."""
        depth = self.policy.ahead(batch) if verified else 0
        if not depth:
            return
        try:
            self._draft_ahead(verified, hidden, depth)
        except Exception:  # noqa: BLE001 - the states are unchanged until the draft succeeded
            log.warning("drafting ahead failed; the next step drafts as usual", exc_info=True)

    @torch.inference_mode()
    def _draft_ahead(self, verified: list[tuple[Sequence, int]], hidden: torch.Tensor, depth: int = 1) -> None:
        """After a verification pass (the runner's last forward): for each ``(sequence, its first
        row in hidden)`` that goes on decoding, the MTP catch-up of the positions just verified and
        the next step's first ``depth`` drafts (``Sequence.mtp_draft``), now, in one native call.

        The catch-up rows are the verification's own positions (its first ``accepted + 1`` rows),
        whose hidden states are a view of the pass's output at batch 1. The deeper drafts need
        their positions' blocks, which the next step reserves: where one is missing (a block
        boundary after rejected drafts were rolled back), only the first is drafted here. Where the
        next step verifies no more drafts than are stored, its :meth:`propose` runs nothing (at
        batch 1 with two drafts: one call per step instead of two, each ~0.1 ms of Python and
        metadata besides its arithmetic). Only the one-call draft step runs here; elsewhere
        :meth:`propose` does the catch-up."""
        fused = self._fused_draft()
        if fused is None:
            return
        seqs: list[Sequence] = []
        rows: list[tuple[Sequence, int, list[int]]] = []
        sel: list[int] = []
        last: list[int] = []
        for seq, first in verified:
            n = seq.mtp_count
            if seq.finished or len(seq.mtp_pending) != 1 or seq.mtp_pending[0][0] is not hidden \
                    or seq.mtp_pending[0][1] != first or seq.mtp_start + n != seq.num_computed:
                continue  # not a plain verified decode (a fallback or a finished request): propose catches up
            seqs.append(seq)
            rows.append((seq, seq.mtp_start, seq.token_ids(seq.mtp_start + 1, n)))
            sel.extend(range(first, first + n))
            last.append(len(sel) - 1)
        if not seqs or len(sel) > Linear.small_rows:
            return
        if sel[-1] - sel[0] + 1 == len(sel):  # consecutive rows (always at batch 1): a view
            prev = hidden[sel[0]:sel[-1] + 1]
        else:
            prev = hidden.index_select(0, torch.tensor(sel, device=hidden.device))
        out, tokens = self._run_fused(fused, rows, prev, last, depth)
        k = len(seqs)
        for j, seq in enumerate(seqs):
            reset(seq)  # every position before num_computed has its MTP entry now
            seq.mtp_draft = [(tokens[i], out[i:i + 1]) for i in range(j, len(tokens), k)]

    @torch.inference_mode()
    def _draft(self, rows: list[tuple[Sequence, int, list[int], torch.Tensor]]
               ) -> tuple[torch.Tensor, list[int] | None]:
        """The MTP module over ``rows`` (as :meth:`ModelRunner.mtp` takes them): the hidden state of
        each entry's last row and, where the whole draft step ran in one native call, its greedy
        draft token (else None: the caller projects the states)."""
        fused = self._fused_draft()
        if fused is None or sum(len(r[2]) for r in rows) > Linear.small_rows:
            return self.runner.mtp(rows), None
        last: list[int] = []
        for _, _, ids, _ in rows:
            last.append((last[-1] if last else -1) + len(ids))
        prev = rows[0][3] if len(rows) == 1 else torch.cat([r[3] for r in rows])
        return self._run_fused(fused, [(r[0], r[1], r[2]) for r in rows], prev, last)

    def _run_fused(self, fused: MTPDraft, rows: list[tuple[Sequence, int, list[int]]], prev: torch.Tensor,
                   last: list[int], depth: int = 1) -> tuple[torch.Tensor, list[int]]:
        """The one-call draft step over ``rows`` (``(seq, first position, next-token ids)``, one row
        per id, their previous states ``prev``), its step inputs from :class:`StepInputs`; the
        states and greedy drafts of the rows ``last`` (with ``depth`` > 1, of up to ``depth``
        depths, depth-major: fewer where a deeper position has no block yet)."""
        cache = self.runner.kv_cache.data
        if self._inputs is None or self._inputs.num_slots != cache.shape[1]:
            self._inputs = StepInputs(self.runner.model.rope, self.runner.block_size, cache.shape[1],
                                       Linear.small_rows)
        step, ids, deeper = self._inputs.build(rows, depth)
        return fused(step, ids, prev.contiguous(), last, cache, deeper, depth if deeper is not None else 1)

    def _fused_draft(self) -> MTPDraft | None:
        """The one-call draft step (:class:`MTPDraft`) where the MTP block runs natively and its
        norms share one epsilon; rebuilt when the module's weights or backend change."""
        m = cast(MTPLayer, self.runner.model.mtp[0])
        if self._mtp_parts is None or self._mtp_parts[0] is not m:  # (attribute reads through nn.Module
            # cost ~1-4 us each in a step: the parts are looked up once, their weights read per call)
            self._mtp_parts = (m, m.block, (m.embed_tokens, m.enorm, m.hnorm, m.eh_proj, m.shared_head.norm,
                                            m.shared_head.head))
        _, block_mod, mods = self._mtp_parts
        block = block_mod.native
        cache = getattr(self.runner.kv_cache, "data", None)
        if block is None or not isinstance(cache, torch.Tensor) or cache.dtype is not torch.float32 \
                or not cache.is_cpu:
            return None
        weights = [cast(torch.Tensor, mod._parameters["weight"]) for mod in mods]
        key = (block, *weights)
        if self._fused_key is None or len(key) != len(self._fused_key) \
                or any(a is not b for a, b in zip(key, self._fused_key)):
            self._fused_key, self._fused = key, None
            if all(n.eps == block.dims.eps for n in (m.enorm, m.hnorm, m.shared_head.norm)):
                try:
                    embed, enorm, hnorm, eh_proj, norm, head = weights
                    self._fused = MTPDraft(block, embed, enorm, hnorm, eh_proj, norm, head, int8_head=INT8_DRAFT_HEAD,
                                          int8_block=INT8_DRAFT_BLOCK)
                except ValueError:  # weights the kernel cannot take: the per-operator path
                    self._fused = None
        return self._fused

    def fill_prompt(self, chunks: list[tuple[Sequence, int]], hidden: torch.Tensor, starts: list[int]) -> None:
        """After the main pass: MTP entries of prompt chunks for every position whose next token is
        already known; the last position of a completed prompt stays pending (its next token is
        about to be sampled)."""
        rows = []
        for (seq, n), first in zip(chunks, starts):
            if seq.num_computed >= seq.num_tokens - 1:  # a decoding sequence
                continue
            s, known = seq.num_computed, min(n, seq.num_tokens - 1 - seq.num_computed)
            if known > 0:
                rows.append((seq, s, seq.token_ids(s + 1, known), hidden[first:first + known]))
            reset(seq, s + known)  # (a prompt chunk follows filled ones: nothing was pending)
        if rows:
            self.runner.mtp(rows)

    def keep_plain(self, chunks: list[tuple[Sequence, int]], hidden: torch.Tensor | None) -> None:
        """After a step without drafts (the plain path, kept as lean as an engine without
        speculation): decode rows join their sequence's pending states, prompt chunks fill their
        MTP entries. A decode row is one tuple appended (and, at :data:`PENDING_CAP`, the oldest
        one-row entry dropped) inline: at batch 64 the general :func:`keep` per sequence cost ~1%
        of a plain step. In a step past the policy's limit (:meth:`lookahead`), where no step of
        that size speculates, decode rows are not kept: holding every step's hidden states for
        :data:`PENDING_CAP` steps made those steps 4-11% dearer than the plain engine's at batch 64
        (demo model, whole batches one engine after the other). A sequence drafts again one plain
        step after the batch shrinks; the MTP entries of the positions not kept stay stale (lower
        acceptance, never a different output)."""
        assert hidden is not None
        first, starts, prompt = 0, [], False
        small = hidden.shape[0] <= 4 * PENDING_CAP
        past = self.past_limit
        for seq, n in chunks:
            if seq.num_computed < seq.num_tokens - 1:
                prompt = True
            elif past and n == 1:
                seq.mtp_start = seq.num_computed + 1  # (the row computed now: its successor is next)
                if seq.mtp_count:
                    seq.mtp_count = 0
                    seq.mtp_pending = []
                seq.mtp_draft = None
            elif n == 1 and small:
                pending = seq.mtp_pending
                pending.append((hidden, first, first + 1))
                seq.mtp_draft = None
                if seq.mtp_count < PENDING_CAP:
                    seq.mtp_count += 1
                else:
                    h, a, b = pending[0]
                    if b - a == 1:
                        del pending[0]
                    else:
                        pending[0] = (h, a + 1, b)
                    seq.mtp_start += 1
            else:
                keep(seq, hidden, first, first + n)
            starts.append(first)
            first += n
        if prompt:
            self.fill_prompt(chunks, hidden, starts)
            for (seq, n), f in zip(chunks, starts):
                if seq.mtp_start > seq.num_computed:  # a prompt chunk: its completed prompt's last row
                    keep(seq, hidden, f + seq.mtp_start - seq.num_computed, f + n)

    def advance(self, seq: Sequence, n: int, drafts: list[int], emitted: list[int] | None, hidden: torch.Tensor,
                first: int) -> int:
        """Bookkeeping after verification; returns the positions of the chunk that are now computed
        (all ``n`` without drafts, else the accepted drafts plus the verified token)."""
        accepted = len(emitted) - 1 if drafts and emitted is not None else 0
        done = n - len(drafts) + accepted
        if drafts:
            self.verifications += 1
            self.drafted += len(drafts)
            self.accepted += accepted
            self.tracker.record(len(drafts), accepted)
        # pending from the first position without an MTP entry or a pending state: a completed
        # prompt's last row (fill_prompt did the others) or every computed decode row
        keep(seq, hidden, first + seq.mtp_start + seq.mtp_count - seq.num_computed, first + done)
        return done

    # -- start-up measurement ------------------------------------------------------------------------
    def measure_costs(self, max_batch: int, free_blocks: int) -> StepCosts:
        """Time plain decode steps and steps with 1..K drafts at batch 1, 2, 4, ... over throwaway
        sequences in free blocks, until speculation could not pay even if every draft were accepted,
        or the blocks run out (the policy extrapolates then). The sequences hold random tokens (a
        fixed seed): with one token repeated every row routed to the same experts, and a MoE
        model's verification of ``K + 1`` rows cost little more than a plain step (1.10-1.13x a
        plain step with two drafts at batch 1 on the demo model, against 1.2-1.4x while serving)."""
        ctx, bs = CALIBRATION_CONTEXT, self.runner.block_size
        rng, vocab = random.Random(0), self.runner.model.config.vocab_size
        per_seq = -(-(ctx + self.k + 1) // bs)
        batches: list[int] = []
        plain: list[float] = []
        spec: list[list[float]] = [[] for _ in range(self.k)]
        b, complete = 1, False
        while b <= max_batch and b * per_seq <= free_blocks:
            seqs = [Sequence(f"calibration-{i}", rng.choices(range(vocab), k=ctx + self.k + 1), _GREEDY)
                    for i in range(b)]
            for i, s in enumerate(seqs):
                s.block_table = list(range(i * per_seq, (i + 1) * per_seq))
            times = self._time(seqs)
            t_plain = times[0]
            batches.append(b)
            plain.append(t_plain)
            for k in range(1, self.k + 1):
                spec[k - 1].append(times[k])
            if all(spec[k - 1][-1] >= (k + 1) * t_plain for k in range(1, self.k + 1)):
                complete = True
                break
            b *= 2
        if not batches:
            raise ValueError(f"the KV cache ({free_blocks} free blocks) cannot hold one sequence of {ctx} tokens "
                             "to measure speculation's step costs; give --speculative-max-batch instead")
        return StepCosts(tuple(batches), tuple(plain), tuple(tuple(s) for s in spec), complete)

    def _fake_step(self, seqs: list[Sequence], k: int) -> None:
        """A decode step with ``k`` drafts as the engine runs it, every draft of the previous step
        accepted (the most catch-up rows): the first draft from the previous step's draft-ahead
        where that runs (the one-call draft step, up to ``Linear.small_rows`` catch-up rows), else
        from the MTP catch-up of the ``k + 1`` pending rows; deeper ones by the MTP module; the
        verification; and the draft-ahead of the next step (with the verification in one call
        where the engine's greedy steps run so, :meth:`verify_fused`; the calibration sequences are
        greedy)."""
        hidden_size = self.runner.model.config.hidden_size
        dtype = self.runner.kv_cache.dtype
        zeros = torch.zeros(k + 1, hidden_size, dtype=dtype, device=self.runner.device)
        ahead = k > 0 and self._fused_draft() is not None and len(seqs) * (k + 1) <= Linear.small_rows
        for s in seqs:
            s.num_computed = CALIBRATION_CONTEXT - 1
            reset(s, s.num_computed if ahead else s.num_computed - (k + 1))
            if ahead:
                s.mtp_draft = [(s.prompt_ids[-1 - j], zeros[:1]) for j in range(k)]
            else:
                keep(s, zeros, 0, k + 1)
        chunks = [(s, 1 + k) for s in seqs]
        drafts = self.propose(chunks, {s.request_id: k for s in seqs}) if k else {}
        fused = self._fused_draft() if ahead and FUSED_STEP else None
        if fused is not None and self.runner.speculate(chunks, drafts, fused, k) is not None:
            return  # the verification and the next drafts in one call, as verify_fused runs them
        hidden, starts, logits = self.runner.run(chunks, drafts, list(range(len(seqs) * (k + 1))))
        assert logits is not None
        self.sampler.verify(logits, [s.request_id for s in seqs], [s.params for s in seqs],
                            [drafts.get(s.request_id, []) for s in seqs])
        if ahead:
            for s, first in zip(seqs, starts):
                reset(s)
                keep(s, hidden, first, first + k + 1)
                s.num_computed += k + 1
            self._draft_ahead(list(zip(seqs, starts)), hidden, k)

    def _time(self, seqs: list[Sequence]) -> list[float]:
        """Seconds of a step with 0, 1, ..., K drafts: the fastest of the rounds (after a warm-up
        one; :data:`CALIBRATION_ROUNDS`) that interleave the variants (interference from other
        processes only ever adds time). On
        the CPU, this thread's CPU time: where other processes share the cores, a step long enough
        to be preempted almost always is, so the fastest wall time favoured the shorter plain step
        (measured at load ~20 on 2 cores: 2.8x a plain step with 2 drafts, against 1.9x in use)."""
        cuda = self.runner.device.type == "cuda"
        clock = time.perf_counter if cuda else time.thread_time
        best = [float("inf")] * (self.k + 1)
        start, r = time.perf_counter(), 0
        # at least six rounds, more while they are cheap (a small batch's step is a few ms, and one
        # slow round in six, a cache another process emptied, skewed the plain/speculative ratio)
        while r < CALIBRATION_ROUNDS[0] or (r < CALIBRATION_ROUNDS[1] and time.perf_counter() - start < 0.25):
            r += 1
            for k in range(self.k + 1):
                if cuda:
                    torch.cuda.synchronize(self.runner.device)
                t0 = clock()
                self._fake_step(seqs, k)
                if cuda:
                    torch.cuda.synchronize(self.runner.device)
                if r > 1:
                    best[k] = min(best[k], clock() - t0)
        return best


def _argmax(logits: torch.Tensor) -> list[int]:
    if logits.is_cpu and logits.is_contiguous() and logits.dtype is torch.float32 and kernels.available():
        return kernels.argmax_rows(logits).tolist()
    return logits.argmax(dim=-1).tolist()
