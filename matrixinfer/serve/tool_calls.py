"""Tool-call parsers: find the tool calls in a chat answer (pure, no I/O).

``deepseek`` reads DeepSeek-V3/R1's markup, as vLLM's ``deepseek_v3`` parser does::

    text<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arguments": ...}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

Text before the first ``<｜tool▁calls▁begin｜>`` is the answer's content. ``tool_choice`` values
that force a call (``required`` or a named function) are honoured by opening the call in the prompt
(:func:`forced_call_prefix`), so the model continues inside it.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_CALL_PARSERS = ("deepseek",)
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(?P<type>.*?)" + re.escape(SEP) + r"(?P<name>[^\n]*)\n```json\n"
                   r"(?P<args>.*?)\n```" + re.escape(CALL_END), re.DOTALL)


def forced_call_prefix(tool_choice: Any) -> str:
    """Text appended to the prompt so that the answer is a call: of any tool (``required``) or of
    the named one; empty for ``auto`` and ``none``."""
    if tool_choice == "required":
        return CALLS_BEGIN + CALL_BEGIN + "function" + SEP
    if isinstance(tool_choice, dict):
        return CALLS_BEGIN + CALL_BEGIN + "function" + SEP + tool_choice["function"]["name"] + "\n```json\n"
    return ""


def parse_tool_calls(text: str, prefix: str = "") -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of an answer (``prefix``: what the prompt already opened). Calls are
    OpenAI's ``{"id", "type": "function", "function": {"name", "arguments"}}``; a call whose
    markup is incomplete (the answer was cut off) is left in the content."""
    full = prefix + text
    at = full.find(CALLS_BEGIN)
    if at < 0:
        return (text or None), []
    calls = []
    for match in _CALL.finditer(full, at):
        args = match.group("args").strip()
        try:
            args = json.dumps(json.loads(args))  # normalised, and checked to be JSON
        except ValueError:
            pass  # passed on as generated: the client sees what the model wrote
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": match.group("name").strip(), "arguments": args}})
    if not calls:
        return (text or None), []
    content = full[:at]
    return (content or None), calls


class ToolCallStream:
    """Streams the content before the tool-call markup and holds back the rest, whose calls come
    with the last output (arguments whole, one delta per call)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.text = ""
        self.sent = 0  # characters of text already streamed as content
        self.in_calls = bool(prefix)

    def feed(self, delta: str) -> str:
        """The content ``delta`` may stream now."""
        self.text += delta
        if self.in_calls:
            return ""
        at = self.text.find(CALLS_BEGIN)
        if at >= 0:
            self.in_calls = True
            out, self.sent = self.text[self.sent:at], at
            return out
        keep = next((k for k in range(min(len(CALLS_BEGIN) - 1, len(self.text)), 0, -1)
                     if CALLS_BEGIN.startswith(self.text[-k:])), 0)
        end = len(self.text) - keep
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The content still held back and the calls, once the answer is complete."""
        content, calls = parse_tool_calls(self.text, self.prefix)
        if calls:
            return "", calls
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return rest, []
