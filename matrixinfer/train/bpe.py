"""Byte-level BPE tokenizer training (the tokenizers library) and its checkpoint files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from matrixinfer.model.default_model import CHAT_TEMPLATE
from matrixinfer.train.recipe import BOS, EOS, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (special tokens first: ``<|bos|>`` is 0).

    Every byte is in the base alphabet, so any text encodes without unknown tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_id(tok: Tokenizer, token: str) -> int:
    """The id of the special token ``token`` (``<|bos|>``, ``<|eos|>``...) in ``tok``."""
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token!r} token (it was not trained with the recipe's specials)")
    return i


def add_bos_post_processor(tok: Tokenizer, bos: str) -> None:
    """Make ``tokenizer.json`` itself prepend BOS, so that Hugging Face's tokenizer (which reads the
    post-processor, not ``add_bos_token``) counts the same tokens as the server does."""
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])


def write_tokenizer(tok: Tokenizer, out_dir: Path, max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_bos_post_processor(tok, BOS)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
