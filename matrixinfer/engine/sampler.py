"""Token sampling for a batch of rows with per-row parameters: logit processing (logit bias;
presence, frequency and repetition penalties; a structured-output grammar's mask), then greedy or
temperature sampling with top-k, top-p and min-p, seeded per request.

Penalties and grammars need the tokens each row has seen: the engine passes ``histories`` (prompt
ids, output ids) when any row asks for either. Log-probabilities, and the most likely alternatives
(``top_logprobs``), are those of the model's raw distribution (as vLLM reports by default), not of
the processed one.
"""

from __future__ import annotations

import torch

from matrixinfer import kernels
from matrixinfer.engine.sampling_params import SamplingParams
from matrixinfer.engine.structured import Grammars

History = tuple[list[int], list[int]]  # a row's prompt ids and output ids so far
TopLogprobs = list[tuple[int, float]]  # the most likely tokens at one position and their log-probabilities


class Sampler:
    """Samples one token per logits row; seeded rows use their own generator so that a request's
    sample does not depend on what else is in the batch. ``grammars``: the engine's structured-output
    matchers (requests with ``structured`` params fail without them)."""

    def __init__(self, grammars: Grammars | None = None) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self.grammars = grammars

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        if self.grammars is not None:
            self.grammars.forget(request_id)

    def export_state(self, request_id: str) -> bytes:
        """A seeded request's generator state (empty if unseeded), to continue it elsewhere."""
        gen = self._generators.get(request_id)
        return bytes(gen.get_state().numpy().tobytes()) if gen is not None else b""

    def import_state(self, request_id: str, state: bytes, device: torch.device) -> None:
        if state:
            gen = torch.Generator(device=device)
            gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
            self._generators[request_id] = gen

    def _generator(self, request_id: str, params: SamplingParams, device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
            self._generators[request_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
                 histories: list[History] | None = None, top: list[TopLogprobs] | None = None,
                 ) -> tuple[list[int], list[float] | None]:
        """Pick a token per row; also return each chosen token's log-probability when any row asks.
        ``histories``: each row's (prompt ids, output ids), needed by rows with penalties or a
        grammar. ``top``: when given, each row's ``top_logprobs`` alternatives are appended to it."""
        raw = logits = logits.float()
        if any(p.processed for p in params):
            logits = process_logits(logits, params, histories)
        logits = self._constrain(logits, raw, request_ids, params, histories)
        if logits.dim() == 2 and logits.shape[1] and logits.is_cpu and logits.is_contiguous() and kernels.available():
            tokens = kernels.argmax_rows(logits)
        else:
            tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            idx = torch.tensor(sampled_rows, device=logits.device)
            rows = logits[idx]
            temps = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
            rows = rows / temps[:, None]
            rows = _top_k_top_p(rows, [params[i].top_k for i in sampled_rows], [params[i].top_p for i in sampled_rows])
            probs = _min_p(rows.softmax(dim=-1), [params[i].min_p for i in sampled_rows])
            unseeded = [j for j, i in enumerate(sampled_rows) if params[i].seed is None]
            if unseeded:  # one draw for all of them: the argmax of p / Exp(1) noise is a draw from p
                sub = probs if len(unseeded) == len(sampled_rows) else probs[unseeded]
                if not bool(torch.isfinite(sub).all()):  # as torch.multinomial refuses such rows
                    raise RuntimeError("probability tensor contains either inf or nan (extreme sampling values)")
                noise = torch.empty_like(sub).exponential_().clamp_(min=torch.finfo(sub.dtype).tiny)
                tokens[idx[unseeded]] = (sub / noise).argmax(dim=-1).to(tokens.dtype)
            for j, i in enumerate(sampled_rows):  # a seeded row draws from its own generator
                if params[i].seed is not None:
                    gen = self._generator(request_ids[i], params[i], logits.device)
                    tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        chosen = tokens.tolist()  # the one host synchronisation per step
        logprobs = None
        if any(p.logprobs for p in params):
            log_probs = raw.log_softmax(dim=-1)
            logprobs = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
            if top is not None:
                top.extend(top_logprobs(log_probs, [p.top_logprobs for p in params]))
        return chosen, logprobs

    def _constrain(self, logits: torch.Tensor, raw: torch.Tensor, request_ids: list[str],
                   params: list[SamplingParams], histories: list[History] | None) -> torch.Tensor:
        """``logits`` with every token a row's grammar forbids masked to -inf (a copy where any
        row has a grammar)."""
        rows = [i for i, p in enumerate(params) if p.structured is not None]
        if not rows:
            return logits
        if self.grammars is None:
            raise ValueError("structured output needs the engine's grammars (Sampler(grammars=...))")
        if histories is None:
            raise ValueError("structured output needs the tokens each row has generated (histories)")
        if logits is raw:
            logits = logits.clone()
        for i in rows:
            so = params[i].structured
            assert so is not None
            allowed = self.grammars.allowed(request_ids[i], so, histories[i][1])
            logits[i].masked_fill_(~allowed.to(logits.device), float("-inf"))
        return logits

    def verify(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
               drafts: list[list[int]], histories: list[History] | None = None,
               top: list[list[TopLogprobs]] | None = None,
               ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Speculative verification. Sequence i owns ``len(drafts[i]) + 1`` consecutive rows of
        ``logits``: the target model's next-token logits at its last verified token and at each of
        its draft tokens. Returns the tokens each sequence emits (its accepted drafts, then one token
        from the target distribution) and, when any request asks, their log-probabilities.

        Greedy rows accept a draft that equals the target's argmax, so the output is exactly the
        greedy output. Sampled rows use speculative rejection sampling (:func:`rejection_sample`), so
        each emitted token follows the target distribution exactly; a seeded request draws from its
        own generator (reproducible, though not the same draws as without speculation). Logit
        processing sees, at each draft row, the drafts before it as generated tokens. ``top``: when
        given, each sequence's list of its emitted tokens' ``top_logprobs`` alternatives is appended.
        A grammar (structured output) masks each row as if the drafts before it were generated, so
        a draft the grammar forbids is rejected and every emitted token follows the grammar."""
        raw = logits = logits.float()
        starts = [0]
        for d in drafts:
            starts.append(starts[-1] + len(d) + 1)
        if any(p.processed for p in params):
            row_params = [p for i, p in enumerate(params) for _ in range(starts[i + 1] - starts[i])]
            row_hist = None
            if histories is not None:
                row_hist = [(h[0], h[1] + d[:j]) for h, d in zip(histories, drafts) for j in range(len(d) + 1)]
            logits = process_logits(logits, row_params, row_hist)
        if any(p.structured is not None for p in params):
            if self.grammars is None or histories is None:
                raise ValueError("structured output needs the engine's grammars and each row's tokens (histories)")
            if logits is raw:
                logits = logits.clone()
            for i, p in enumerate(params):
                if p.structured is not None:
                    masks = self.grammars.allowed_with_drafts(request_ids[i], p.structured, histories[i][1], drafts[i])
                    for j, allowed in enumerate(masks):
                        logits[starts[i] + j].masked_fill_(~allowed.to(logits.device), float("-inf"))
        if logits.dim() == 2 and logits.shape[1] and logits.is_cpu and logits.is_contiguous() and kernels.available():
            best = kernels.argmax_rows(logits)
        else:
            best = logits.argmax(dim=-1)
        target = best.tolist()  # the one host synchronisation for greedy rows
        out: list[list[int]] = []
        for i, d in enumerate(drafts):
            r, a = starts[i], 0
            while a < len(d) and target[r + a] == d[a]:
                a += 1
            out.append(d[:a] + [target[r + a]])
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = [r for i in sampled for r in range(starts[i], starts[i + 1])]
            per_row = [params[i] for i in sampled for _ in range(starts[i + 1] - starts[i])]
            z = logits[torch.tensor(rows, device=logits.device)]
            z = z / torch.tensor([p.temperature for p in per_row], device=logits.device)[:, None]
            probs = _top_k_top_p(z, [p.top_k for p in per_row], [p.top_p for p in per_row]).softmax(dim=-1)
            probs = _min_p(probs, [p.min_p for p in per_row])
            at = 0
            for i in sampled:
                n = starts[i + 1] - starts[i]
                gen = self._generator(request_ids[i], params[i], logits.device)
                out[i] = rejection_sample(probs[at:at + n], drafts[i], gen)
                at += n
        logprobs = None
        if any(p.logprobs for p in params):
            lp = raw.log_softmax(dim=-1)
            dev = lp.device
            logprobs = [lp[starts[i] + torch.arange(len(toks), device=dev), torch.tensor(toks, device=dev)].tolist()
                        for i, toks in enumerate(out)]
            if top is not None:
                for i, toks in enumerate(out):
                    top.append(top_logprobs(lp[starts[i]:starts[i] + len(toks)], [params[i].top_logprobs] * len(toks)))
        return out, logprobs


def rejection_sample(probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None = None) -> list[int]:
    """Speculative rejection sampling for deterministic (greedy) drafts: ``probs`` ``[k + 1, V]``
    holds the target distribution at the last verified token and after each of the ``k`` drafts.

    Draft ``j`` is accepted with probability ``p_j(d_j)``; at the first rejection the token is
    drawn from ``p_j`` without ``d_j`` (renormalised), otherwise the bonus token from ``p_k``. With
    a draft distribution that puts all its mass on ``d_j`` this is the standard ``min(1, p/q)``
    test and its ``max(0, p - q)`` residual, so every emitted token has exactly the target
    distribution ``p_j(x) = p_j(d_j) [x = d_j] + (1 - p_j(d_j)) p_j(x) / (1 - p_j(d_j))``."""
    k = len(drafts)
    if k:
        u = torch.rand(k, generator=generator, device=probs.device)
        p_draft = probs[torch.arange(k, device=probs.device), torch.tensor(drafts, device=probs.device)]
        held = (u < p_draft).tolist()
        a = held.index(False) if False in held else k
    else:
        a = 0
    if a < k:
        residual = probs[a].clone()
        residual[drafts[a]] = 0.0  # u < p(d) failed, so p(d) < 1 and some other token has mass
        last = int(torch.multinomial(residual, 1, generator=generator)[0])
    else:
        last = int(torch.multinomial(probs[k], 1, generator=generator)[0])
    return drafts[:a] + [last]


def top_logprobs(log_probs: torch.Tensor, counts: list[int]) -> list[TopLogprobs]:
    """Row i's ``counts[i]`` most likely tokens and their log-probabilities, most likely first
    (one ``topk`` for the batch and one host copy)."""
    k = max(counts, default=0)
    if k <= 0:
        return [[] for _ in counts]
    values, ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    vs, ts = values.tolist(), ids.tolist()
    return [list(zip(ts[i][:c], vs[i][:c])) for i, c in enumerate(counts)]


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus to -inf."""
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= ks[:, None]
    ps = torch.tensor(top_p, device=logits.device)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # keep a token while the mass *before* it is below p (the top token is always kept)
    drop |= (cum - sorted_logits.softmax(dim=-1)) >= ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def process_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[History] | None,
                   ) -> torch.Tensor:
    """A copy of ``logits`` with each row's logit bias and penalties applied (vLLM's semantics:
    repetition over prompt and output, presence and frequency over the output only)."""
    out = logits.clone()
    vocab = logits.shape[-1]
    dev = logits.device
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = list(p.logit_bias)
            if max(ids) >= vocab:
                raise ValueError(f"logit_bias names token {max(ids)}, outside the vocabulary of {vocab}")
            out[i, torch.tensor(ids, device=dev)] += torch.tensor(list(p.logit_bias.values()), device=dev)
        if not p.penalized:
            continue
        if histories is None:
            raise ValueError("penalties need the tokens each row has seen (histories)")
        prompt, output = histories[i]
        row = out[i]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
            seen[torch.tensor(prompt + output, dtype=torch.long, device=dev)] = True
            r = p.repetition_penalty
            row[seen] = torch.where(row[seen] > 0, row[seen] / r, row[seen] * r)
        if output and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=dev), minlength=vocab)[:vocab]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return out


def _min_p(probs: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Zero the probabilities under ``min_p`` times each row's largest and renormalise (the most
    likely token always stays)."""
    if all(m <= 0.0 for m in min_p):
        return probs
    floor = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=probs.device)[:, None]
    kept = probs.masked_fill(probs < floor, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)
