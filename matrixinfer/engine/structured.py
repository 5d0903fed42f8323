"""Structured output: grammars from ``response_format`` (json_object, json_schema), regexes and
choice lists, enforced with llguidance (a Rust library made for token-level grammar masks; the
alternative, xgrammar, needs triton).

:func:`compile_grammar` turns a :class:`~matrixinfer.engine.sampling_params.StructuredOutput` into
llguidance's grammar text and checks it (the API server calls it to answer a bad schema with a
400). :class:`Grammars` holds one engine's per-request matchers: before each sampling step the
sampler asks for a request's allowed tokens, and the matcher is first brought in step with the
request's output tokens so far. The matcher's state is therefore a function of the tokens alone:
a decode instance of a P/D deployment builds it afresh from the first token the prefill instance
sampled (nothing is pickled or sent), and a preempted request keeps it.

This module imports torch only where a mask is built, so the API server (torch-free)
checks grammars with it. JSON is generated compactly (``", "`` and ``": "`` separators, no free
whitespace): an untrained or weak model otherwise tends to fill a flexible-whitespace grammar with
blank runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import llguidance

from matrixinfer.engine.sampling_params import StructuredOutput

if TYPE_CHECKING:
    import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema, regex or choice list that cannot be compiled (the message says why)."""


def compile_grammar(so: StructuredOutput) -> str:
    """llguidance's grammar for ``so``, checked; GrammarError names what is wrong."""
    if so.kind == "json_object":
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    elif so.kind == "json_schema":
        try:
            schema = json.loads(so.spec)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("the JSON schema must be an object (or true/false)")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
    elif so.kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(so.spec)
    elif so.kind == "choice":
        try:
            choices = json.loads(so.spec)
        except ValueError:
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("the choices must be a non-empty list of non-empty strings")
        grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    else:
        raise GrammarError(f"unknown structured output kind {so.kind!r}")
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"invalid {so.kind.replace('_', ' ')}: {messages[0] if messages else 'rejected'}")
    return grammar


class Grammars:
    """One engine's per-request matchers over its vocabulary.

    ``tokenizer_json``: the checkpoint's tokenizer.json text (read on first use, so an engine that
    never sees a structured request never builds llguidance's tokenizer); ``vocab_size``: the
    logits' width (may exceed the tokenizer's; extra ids are never allowed); ``eos_ids``: the
    tokens that end a request, allowed once the grammar is complete."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_ids: list[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_ids = sorted(t for t in eos_ids if 0 <= t < vocab_size)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._matchers: dict[str, tuple[llguidance.LLMatcher, int]] = {}  # request id -> (matcher, tokens consumed)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json(), n_vocab=self.vocab_size,
                                                     eos_token=self.eos_ids or None)
        return self._tokenizer

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def allowed(self, request_id: str, so: StructuredOutput, output_ids: list[int]) -> torch.Tensor:
        """The tokens ``request_id`` may sample next (a bool mask over the vocabulary), given the
        tokens it has generated so far; ValueError when they left the grammar or nothing is allowed."""
        return self.allowed_with_drafts(request_id, so, output_ids, [])[0]

    def allowed_with_drafts(self, request_id: str, so: StructuredOutput, output_ids: list[int],
                            drafts: list[int]) -> list[torch.Tensor]:
        """Speculative verification: the masks after ``output_ids`` and after each prefix of
        ``drafts`` (``len(drafts) + 1`` masks). At the first draft the grammar forbids, the masks
        stop following the drafts: that draft is rejected by its own row's mask, so the rows after
        it are never used (they get the same mask). The matcher is left after ``output_ids``."""
        matcher = self._sync(request_id, so, output_ids)
        masks = [self._mask(matcher)]
        taken = 0
        for d in drafts:
            if not bool(masks[-1][d]) or d in self.eos_ids or not matcher.consume_token(d):
                break
            taken += 1
            masks.append(self._mask(matcher))
        if taken:
            matcher.rollback(taken)
        return masks + [masks[-1]] * (len(drafts) + 1 - len(masks))

    def _sync(self, request_id: str, so: StructuredOutput, output_ids: list[int]) -> llguidance.LLMatcher:
        """``request_id``'s matcher (built on first use), advanced over ``output_ids``."""
        held = self._matchers.get(request_id)
        if held is None:
            matcher = llguidance.LLMatcher(self.tokenizer, compile_grammar(so), log_level=0)
            if matcher.is_error():
                raise ValueError(f"structured output: {_first_line(matcher.get_error())}")
            held = (matcher, 0)
        matcher, done = held
        if done > len(output_ids):  # tokens were taken back (never by this engine today; cheap to honour)
            matcher.rollback(done - len(output_ids))
            done = len(output_ids)
        if done < len(output_ids):
            new = output_ids[done:]
            if matcher.is_stopped() and all(t in self.eos_ids for t in new):
                pass  # EOS after the grammar completed (min_tokens kept the request going): nothing to match
            elif not matcher.consume_tokens(new):
                self._matchers.pop(request_id, None)
                raise ValueError("structured output: the generated tokens left the grammar "
                                 f"({_first_line(matcher.get_error())})")
            done = len(output_ids)
        self._matchers[request_id] = (matcher, done)
        return matcher

    def _mask(self, matcher: llguidance.LLMatcher) -> torch.Tensor:
        import numpy as np
        import torch  # here: the API server checks grammars with this module and stays torch-free

        # one bit per token in little-endian 32-bit words: token 8 * byte + bit, in byte order
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = bits[:self.vocab_size].astype(bool)
        if matcher.is_stopped():  # complete: only EOS ends it
            mask[:] = False
            mask[self.eos_ids] = True
        if not mask.any():
            raise ValueError("structured output: no token can continue the output "
                             f"({_first_line(matcher.get_error())})")
        return torch.from_numpy(mask)


def _first_line(error: str) -> str:
    """llguidance's error without the parser state dump that follows it."""
    return error.strip().splitlines()[0] if error.strip() else "no error message"
