"""Token streams and fixed-length training windows over the encoded corpus."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tokenizers import Tokenizer

from matrixinfer.train.bpe import special_id
from matrixinfer.train.corpus import SourceFile
from matrixinfer.train.recipe import BOS, EOS


def encode_files(tok: Tokenizer, files: list[SourceFile]) -> torch.Tensor:
    """One int32 stream: each file as ``<|bos|>`` + its tokens + ``<|eos|>``, in order."""
    bos, eos = special_id(tok, BOS), special_id(tok, EOS)
    encodings = tok.encode_batch([f.text for f in files], add_special_tokens=False)
    ids: list[int] = []
    for enc in encodings:
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping ``[N, length]`` windows cut from the start of ``stream`` (the tail is dropped)."""
    n = stream.numel() // length
    if n == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens holds no window of {length}")
    return stream[: n * length].view(n, length).long()


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, seed: int,
            start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len + 2]`` batches (inputs plus the next-token and MTP targets).

    Windows start every ``seq_len`` tokens; each epoch visits them in an order drawn from
    ``seed`` and the epoch number, so resuming at ``start_step`` reproduces the same batches.
    """
    n = (stream.numel() - 2) // seq_len
    starts = torch.arange(n) * seq_len
    per_epoch = n // batch_size
    step = start_step
    offsets = torch.arange(seq_len + 2)
    while True:
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        idx = starts[order[i * batch_size:(i + 1) * batch_size]]
        yield stream[idx[:, None] + offsets[None, :]].long()
        step += 1
