"""Tokenizer from a checkpoint directory: tokenizer.json (tokenizers library) plus
tokenizer_config.json (special tokens, chat template rendered with jinja2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer file that is missing or unusable."""


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """Encode/decode text and render chat templates for one checkpoint."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise TokenizerError(f"{tj}: no such file (the checkpoint needs tokenizer.json)")
        try:
            self._tok = HFTokenizer.from_file(str(tj))
        except Exception as exc:
            raise TokenizerError(f"{tj}: cannot load tokenizer ({exc})") from exc
        cfg_path = path / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(self.config.get("add_bos_token", self.bos_token_id is not None))
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values()), None))
        self._template = self._compile(self.chat_template) if self.chat_template else None

    def _compile(self, template: str) -> Any:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = self._raise
        return env.from_string(template)

    def set_chat_template(self, template: str) -> None:
        """Replace the checkpoint's chat template (``serve --chat-template FILE``); TokenizerError
        if it is not valid Jinja."""
        try:
            self._template = self._compile(template)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise TokenizerError(f"chat template: {exc}") from None
        self.chat_template = template

    @staticmethod
    def _raise(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance builds its token table from)."""
        return str(self._tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` (and the ``tools`` offered, as Hugging Face templates take them) with
        the checkpoint's chat template (BOS included by the template)."""
        if self._template is None:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    suffix: str = "") -> list[int]:
        """Token ids of a chat prompt (the template already carries any BOS), ``suffix`` text after it."""
        return self.encode(self.apply_chat_template(messages, tools=tools) + suffix, add_special_tokens=False)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Each push decodes only the tokens since the last emitted boundary (plus the previous window,
    so decoders that treat a token by its left neighbour agree), not the whole output.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):  # nothing new, or a character is incomplete
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
