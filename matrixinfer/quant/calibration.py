"""Calibration and evaluation text, and how a model is scored on it.

The built-in data is the demo model's held-out split of the CPython stdlib corpus
(:mod:`matrixinfer.train.corpus`): never trained on. Its files (sorted by path) are cut in two
halves: the first calibrates, the second evaluates (``benchmarks/int8_accuracy.py``), so the
quantizer never sees the text it is judged on. Other text comes from files, encoded with the
checkpoint's own tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from matrixinfer.model.attention import AttentionMetadata, KVCache, make_cache
from matrixinfer.model.deepseek import DeepseekForCausalLM
from matrixinfer.model.tokenizer import Tokenizer
from matrixinfer.train import corpus
from matrixinfer.train.metrics import sample_windows
from matrixinfer.train.recipe import TrainConfig

BUILTIN = "builtin"


class CalibrationError(ValueError):
    """Calibration text that cannot be used (the message names the file)."""


def builtin_texts(half: str) -> list[str]:
    """The held-out stdlib files of the demo corpus: ``"calibration"`` (first half, by path) or
    ``"evaluation"`` (second half)."""
    if half not in ("calibration", "evaluation"):
        raise ValueError(f"half must be calibration or evaluation, got {half!r}")
    _, heldout = corpus.split(corpus.gather(), TrainConfig().heldout_percent)
    cut = len(heldout) // 2
    files = heldout[:cut] if half == "calibration" else heldout[cut:]
    return [f.text for f in files]


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """The UTF-8 text of each file (a clear error naming the file otherwise)."""
    texts = []
    for p in map(Path, paths):
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{p}: cannot read calibration text ({exc})") from exc
    return texts


def encode_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """One token stream: each text as bos + tokens + eos (the special tokens the tokenizer has)."""
    ids: list[int] = []
    for text in texts:
        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(model_dir: str | Path, source: str | Sequence[str | Path], length: int, count: int,
            half: str = "calibration") -> torch.Tensor:
    """``[count, length]`` token windows (fewer if the text is short) spread evenly over the text of
    ``source``: ``"builtin"`` (the held-out stdlib ``half``) or text files, encoded with the
    tokenizer of ``model_dir``."""
    texts = builtin_texts(half) if source == BUILTIN else read_texts([source] if isinstance(source, str) else source)
    stream = encode_stream(Tokenizer(model_dir), texts)
    if stream.numel() < length:
        raise CalibrationError(f"{source}: {stream.numel()} tokens, fewer than one window of {length}")
    return sample_windows(stream, length, count)


@torch.no_grad()
def nll(model: DeepseekForCausalLM, windows: torch.Tensor, batch_size: int = 8,
        kv_cache_dtype: str | None = None) -> tuple[float, float | None]:
    """Mean next-token negative log-likelihood of ``windows`` ``[N, L + 1]`` and, with an MTP module,
    the mean NLL of its token-after-next prediction (None without one). With ``kv_cache_dtype``
    (``auto``/``int8``) the main model attends through a paged cache of that kind, as in serving."""
    device = model.model.embed_tokens.weight.device
    length = windows.shape[1] - 1
    total, mtp_total, n_tok, n_mtp = 0.0, 0.0, 0, 0
    for start in range(0, windows.shape[0], batch_size):
        w = windows[start:start + batch_size].to(device)
        b = w.shape[0]
        meta = AttentionMetadata.build([length] * b, device=device)
        pos = torch.arange(length, device=device).repeat(b)
        if kv_cache_dtype is None:
            hidden = model(w[:, :-1].reshape(-1), pos, meta)
        else:
            cache, paged = paged_cache(model, kv_cache_dtype, b, length)
            hidden = model(w[:, :-1].reshape(-1), pos, paged, cache)
        total += F.cross_entropy(model.compute_logits(hidden), w[:, 1:].reshape(-1), reduction="sum").item()
        n_tok += b * length
        if len(model.mtp):
            draft = model.mtp_logits(model.mtp_forward(w[:, 1:].reshape(-1), pos, hidden, meta)).view(b, length, -1)
            mtp_total += F.cross_entropy(draft[:, :-1].reshape(-1, draft.shape[-1]), w[:, 2:].reshape(-1),
                                         reduction="sum").item()
            n_mtp += b * (length - 1)
    return total / max(n_tok, 1), (mtp_total / n_mtp if n_mtp else None)


def perplexity(model: DeepseekForCausalLM, windows: torch.Tensor, kv_cache_dtype: str | None = None) -> float:
    """Held-out perplexity of ``windows`` ``[N, L + 1]`` (through a paged cache of ``kv_cache_dtype``)."""
    return math.exp(nll(model, windows, kv_cache_dtype=kv_cache_dtype)[0])


def paged_cache(model: DeepseekForCausalLM, kv_cache_dtype: str, seqs: int, length: int,
               block_size: int = 16) -> tuple[KVCache, AttentionMetadata]:
    """A paged cache of ``kv_cache_dtype`` for ``seqs`` sequences of ``length`` tokens, and their metadata."""
    device = model.model.embed_tokens.weight.device
    per_seq = -(-length // block_size)
    cache = make_cache(kv_cache_dtype, model.num_cache_layers, seqs * per_seq, block_size, model.config.kv_cache_dim,
                       model.config.kv_lora_rank, model.model.embed_tokens.weight.dtype, device)
    tables = torch.arange(seqs * per_seq, device=device).view(seqs, per_seq)
    return cache, AttentionMetadata.build([length] * seqs, [length] * seqs, tables, block_size, device)
