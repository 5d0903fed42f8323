"""``train-demo`` end to end: corpus -> tokenizer -> model -> HF checkpoint -> held-out report."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from matrixinfer.config import ModelConfig
from matrixinfer.model.loader import load_model
from matrixinfer.train import corpus
from matrixinfer.train.bpe import special_id, train_tokenizer, write_tokenizer
from matrixinfer.train.data import encode_files
from matrixinfer.train.export import save_checkpoint
from matrixinfer.train.loop import build_model, log_line, train
from matrixinfer.train.metrics import BigramModel, HeldoutReport, evaluate, sample_windows
from matrixinfer.train.recipe import BOS, EOS, TrainConfig, model_config

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"


def run(tc: TrainConfig, out_dir: Path, work_dir: Path, device: torch.device,
        log: Callable[[str], None] = log_line) -> dict[str, object]:
    """Train the demo model from scratch (resuming from ``work_dir``) and write it to ``out_dir``."""
    t_start = time.time()
    torch.manual_seed(tc.seed)
    if device.type == "cpu":
        torch.set_num_threads(tc.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    files = corpus.gather()
    train_files, heldout_files = corpus.split(files, tc.heldout_percent)
    log(f"corpus: {len(files)} files from {corpus.stdlib_root()}: {len(train_files)} train, "
        f"{len(heldout_files)} held-out")
    tok = train_tokenizer((f.text for f in train_files), tc.vocab_size)
    write_tokenizer(tok, out_dir, max_length=model_config(tc.vocab_size, 0, 1)["max_position_embeddings"])
    stream = encode_files(tok, train_files)
    heldout = encode_files(tok, heldout_files)
    log(f"tokens: {stream.numel()} train, {heldout.numel()} held-out (vocab {tok.get_vocab_size()})")
    config = model_config(tok.get_vocab_size(), special_id(tok, BOS), special_id(tok, EOS))
    model = build_model(ModelConfig.from_dict(config), tc.seed)
    t_train = time.time()
    model = train(model, stream, tc, work_dir, device, log)
    train_s = time.time() - t_train
    save_checkpoint(model.cpu(), config, out_dir)
    # Report on what ships: the bfloat16 checkpoint reloaded through the loader (float32 compute).
    shipped = load_model(out_dir, progress=False)
    windows = sample_windows(heldout, tc.seq_len + 1, tc.eval_windows)
    report = evaluate(shipped, windows)
    bigram = BigramModel(stream, tok.get_vocab_size()).perplexity(windows)
    summary = _summary(report, bigram, tc, train_s, time.time() - t_start, stream.numel(), device)
    _write_corpus_md(out_dir, tc, summary, len(train_files), len(heldout_files))
    log(json.dumps(summary, indent=2))
    return summary


def _summary(report: HeldoutReport, bigram: float, tc: TrainConfig, train_s: float, total_s: float,
             train_tokens: int, device: torch.device) -> dict[str, object]:
    return {
        "heldout_tokens": report.tokens,
        "perplexity": round(report.perplexity, 3),
        "bigram_perplexity": round(bigram, 3),
        "mtp_acceptance": round(report.mtp_acceptance, 4),
        "expert_load_max_over_mean": {k: round(v, 3) for k, v in report.expert_max_over_mean.items()},
        "expert_load_min_fraction": {k: round(min(v), 4) for k, v in report.expert_fractions.items()},
        "train_tokens": train_tokens,
        "tokens_seen": tc.steps * tc.batch_size * tc.seq_len,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(total_s, 1),
        "device": str(device),
        "threads": tc.threads if device.type == "cpu" else None,
    }


def _write_corpus_md(out_dir: Path, tc: TrainConfig, summary: dict[str, object], n_train: int,
                     n_heldout: int) -> None:
    """CORPUS.md: how the corpus was gathered, the license notice, and the run that produced the weights."""
    import sys

    license_src = corpus.stdlib_root() / "LICENSE.txt"
    if license_src.exists():
        shutil.copyfile(license_src, out_dir / "LICENSE-PSF.txt")
    text = f"""# Demo model: corpus and training record

A small DeepSeek-V3-architecture model trained from scratch by `matrixinfer train-demo` on the
Python source of the CPython standard library. It is a toy Python code completer.

## Corpus recipe
Python {sys.version.split()[0]} ({sys.implementation.name}); {n_train} training files, {n_heldout} held-out files.

{corpus.recipe_text(tc.heldout_percent)}
## License notice
The training corpus is the Python standard library,
Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.
It is distributed under the PSF License Agreement (Python Software Foundation License Version 2);
the full text shipped with the interpreter is copied beside this file as `LICENSE-PSF.txt`.
These weights are a derived work trained on that corpus.

## Training run
Hyperparameters (`matrixinfer.train.recipe.TrainConfig`):

```json
{json.dumps(tc.to_dict(), indent=2)}
```

Held-out report (the shipped bfloat16 weights evaluated in float32):

```json
{json.dumps(summary, indent=2)}
```
"""
    (out_dir / "CORPUS.md").write_text(text)
