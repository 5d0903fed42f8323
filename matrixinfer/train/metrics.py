"""Held-out quality of the demo model: perplexity against a bigram baseline, greedy MTP draft
acceptance and per-layer expert load. Used by the training report and the acceptance tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from matrixinfer.model.attention import AttentionMetadata
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.train.balance import ExpertLoad


class BigramModel:
    """Token bigram counts with Dirichlet smoothing towards the (add-one) unigram distribution:
    ``p(b | a) = (c(a, b) + alpha * p(b)) / (c(a) + alpha)``."""

    def __init__(self, stream: torch.Tensor, vocab_size: int) -> None:
        s = stream.long()
        self.vocab_size = vocab_size
        self.pairs, self.pair_counts = torch.unique(s[:-1] * vocab_size + s[1:], return_counts=True)
        self.context_counts = torch.bincount(s[:-1], minlength=vocab_size).double()
        uni = torch.bincount(s, minlength=vocab_size).double() + 1.0
        self.unigram = uni / uni.sum()

    def nll(self, prev: torch.Tensor, nxt: torch.Tensor, alpha: float) -> torch.Tensor:
        """Negative log-likelihood of each ``nxt[i]`` after ``prev[i]``."""
        codes = prev.long() * self.vocab_size + nxt.long()
        idx = torch.searchsorted(self.pairs, codes).clamp(max=self.pairs.numel() - 1)
        c = torch.where(self.pairs[idx] == codes, self.pair_counts[idx], 0).double()
        p = (c + alpha * self.unigram[nxt.long()]) / (self.context_counts[prev.long()] + alpha)
        return -p.log()

    def perplexity(self, windows: torch.Tensor) -> float:
        """Best perplexity over a few smoothing strengths on the next-token targets of ``windows``
        ``[N, L + 1]`` (tuning on the evaluation text makes the baseline only stronger)."""
        prev, nxt = windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1)
        return min(math.exp(self.nll(prev, nxt, a).mean().item()) for a in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0))


@dataclass
class HeldoutReport:
    """What the model does on held-out windows."""

    perplexity: float
    mtp_acceptance: float
    expert_fractions: dict[str, list[float]]
    expert_max_over_mean: dict[str, float]
    tokens: int


@torch.no_grad()
def evaluate(model: DeepseekForCausalLM, windows: torch.Tensor, batch_size: int = 8) -> HeldoutReport:
    """Score ``windows`` ``[N, L + 1]``: perplexity of the L next-token targets, and the share of
    positions i where MTP's greedy draft of token i+2 (given the true token i+1) equals the main
    model's greedy prediction at i+1 (the speculative-decoding acceptance of one draft)."""
    device = next(model.parameters()).device
    length = windows.shape[1] - 1
    load = ExpertLoad(model)
    nll, n_tok, accepted, drafted = 0.0, 0, 0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            w = windows[start:start + batch_size].to(device)
            b = w.shape[0]
            meta = AttentionMetadata.build([length] * b, device=device)
            pos = torch.arange(length, device=device).repeat(b)
            hidden = model(w[:, :-1].reshape(-1), pos, meta)
            logits = model.compute_logits(hidden)
            nll += F.cross_entropy(logits, w[:, 1:].reshape(-1), reduction="sum").item()
            n_tok += logits.shape[0]
            if len(model.mtp):
                draft = model.mtp_logits(model.mtp_forward(w[:, 1:].reshape(-1), pos, hidden, meta))
                draft = draft.argmax(-1).view(b, length)[:, :-1]
                main = logits.argmax(-1).view(b, length)[:, 1:]
                accepted += int((draft == main).sum())
                drafted += draft.numel()
    finally:
        load.close()
    return HeldoutReport(
        perplexity=math.exp(nll / max(n_tok, 1)),
        mtp_acceptance=accepted / max(drafted, 1),
        expert_fractions={n: f.tolist() for n, f in zip(load.names, load.fractions())},
        expert_max_over_mean=dict(zip(load.names, load.max_over_mean())),
        tokens=n_tok,
    )


def sample_windows(stream: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens spread evenly over ``stream`` (deterministic)."""
    n = stream.numel() // length
    if n == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens holds no window of {length}")
    picks = torch.linspace(0, n - 1, min(count, n)).round().long()
    return torch.stack([stream[i * length:(i + 1) * length] for i in picks.tolist()]).long()
