"""Reasoning parsers (--reasoning-parser): a thinking model's `<think>...</think>` section comes
back apart from its answer, as `reasoning` (vLLM's current field name) beside `content`, whole or
as it streams, by one rule both ways:
- deepseek_r1: everything before `</think>` is reasoning (the chat template opens the section in
  the prompt, so `<think>` may or may not be in the output); with no `</think>`, all of it is.
  Also the parser for templates that open the section themselves (Qwen3 *-Thinking-2507, QwQ).
- qwen3: output that opens with `<think>` is reasoning up to `</think>`, as above; output that
  does not (thinking switched off with enable_thinking=false) is all content.
"""

from __future__ import annotations

from tokenmill.server.streaming import held_back

REASONING_PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


def _thinks(parser: str, text: str, final: bool) -> bool | None:
    """Whether the output opens with reasoning; None while "<thi" could still become "<think>"
    (whose text is not reasoning)."""
    if text.startswith(START):
        return True
    if not final and START.startswith(text):
        return None
    return parser == "deepseek_r1"


def split_reasoning(parser: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a finished choice; None for a part that is empty."""
    if not _thinks(parser, text, final=True):
        return None, text
    body = text.removeprefix(START)
    end = body.find(END)
    if end < 0:
        return body or None, None
    return body[:end] or None, body[end + len(END):] or None


class ReasoningStream:
    """One streamed choice: its growing text as new reasoning and new content, agreeing with
    split_reasoning on the whole text. What could still be part of a marker is held back."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.mode: str | None = None  # None (undecided), "reasoning", "content"
        self.sent = 0  # the text up to here has been sent (or skipped, for markers)
        self.content_from: int | None = None  # where the content starts in the text, once known

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """(new reasoning, new content) for the choice's whole text so far."""
        if self.mode is None:
            thinks = _thinks(self.parser, text, final)
            if thinks is None:
                return "", ""
            self.mode = "reasoning" if thinks else "content"
            self.sent = len(START) if thinks and text.startswith(START) else 0
            if not thinks:
                self.content_from = 0
        reasoning = ""
        if self.mode == "reasoning":
            end = text.find(END, self.sent)  # held text was not sent, so a marker starts at or after sent
            if end >= 0:
                reasoning, self.sent = text[self.sent:end], end + len(END)
                self.mode, self.content_from = "content", self.sent
            else:
                upto = len(text) if final else len(text) - held_back(text, END)
                if upto > self.sent:
                    reasoning, self.sent = text[self.sent:upto], upto
        content = ""
        if self.mode == "content":
            content, self.sent = text[self.sent:], len(text)
        return reasoning, content
