"""Reasoning parsers: split a chat answer into ``reasoning_content`` and ``content`` (pure, no I/O).

``deepseek-r1`` follows the model family's markup, as vLLM's and SGLang's parsers of that name do:
the answer is ``<think>reasoning</think>content``, where the opening tag may be missing (newer R1
chat templates end the prompt with it). Everything before the first ``</think>`` is reasoning, with
a leading ``<think>`` dropped; an answer without ``</think>`` is all reasoning (it was cut off while
thinking). The streaming form holds back text that could be the start of a tag split across tokens.
"""

from __future__ import annotations

REASONING_PARSERS = ("deepseek-r1",)


class ReasoningParser:
    """One choice's split, fed text deltas as they are generated."""

    start, end = "<think>", "</think>"

    def __init__(self) -> None:
        self.held = ""  # text not yet emitted: a possible partial tag
        self.thinking = True
        self.at_start = True  # a leading <think> is still possible

    def feed(self, text: str) -> tuple[str, str]:
        """The ``(reasoning, content)`` deltas that ``text`` completes."""
        if not self.thinking:
            return "", text
        buf = self.held + text
        if self.at_start:
            if self.start.startswith(buf):  # still possibly the opening tag
                self.held = buf
                return "", ""
            self.at_start = False
            if buf.startswith(self.start):
                buf = buf[len(self.start):]
        at = buf.find(self.end)
        if at >= 0:
            self.thinking, self.held = False, ""
            return buf[:at], buf[at + len(self.end):]
        keep = next((k for k in range(min(len(self.end) - 1, len(buf)), 0, -1) if self.end.startswith(buf[-k:])), 0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], ""

    def finish(self) -> tuple[str, str]:
        """What was held back, once the answer is complete (a partial tag is plain reasoning)."""
        held, self.held = self.held, ""
        if self.at_start and held == self.start:
            held = ""
        return (held, "") if self.thinking else ("", held)


def split_reasoning(text: str) -> tuple[str, str | None]:
    """A whole answer's ``(reasoning, content)``; content None when the answer has none."""
    p = ReasoningParser()
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    content = c1 + c2
    return r1 + r2, content if content else None
