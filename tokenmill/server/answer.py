"""A generated choice's text as the parts of an assistant's answer: reasoning (with a
--reasoning-parser), content, and tool calls (with tools). The chat endpoint and the Responses
API split answers alike, whole (answer_parts) or as they stream (AnswerStream).
"""

from __future__ import annotations

from typing import Any

from tokenmill.server.reasoning import ReasoningStream, split_reasoning
from tokenmill.server.tools import ToolSetup, ToolStream, parse_calls


def tool_finish(tools: ToolSetup, reason: str | None, called: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the model chose to call (auto, required); a
    named function's call ends with "stop", as OpenAI ends it."""
    return "tool_calls" if called and reason == "stop" and tools.mode != "named" else reason


def answer_parts(tools: ToolSetup | None, rparser: str | None, text: str,
                 reason: str | None) -> tuple[str | None, str | None, list[dict[str, Any]], str | None]:
    """(reasoning, content, tool calls, finish reason) of a finished choice; None for a part that
    is empty (content: none at all, as when the output is all reasoning)."""
    thought, content = None, text
    if rparser is not None:
        thought, content = split_reasoning(rparser, text)
    calls: list[dict[str, Any]] = []
    if tools is not None:
        rest, calls = parse_calls(tools, content or "", complete=reason == "stop")
        content = rest if content is not None else None
        reason = tool_finish(tools, reason, bool(calls))
    return thought, content, calls, reason


class AnswerStream:
    """One streamed choice: its growing text as new reasoning, new content and tool-call deltas
    (chat's format), agreeing with answer_parts on the whole text."""

    def __init__(self, tools: ToolSetup | None, rparser: str | None) -> None:
        self.tools = tools
        self.reasoning = ReasoningStream(rparser) if rparser is not None else None
        self.calls = ToolStream(tools) if tools is not None else None

    def _answer(self, text: str) -> str:
        """The text after the reasoning (all of it without a parser; none while it is undecided)."""
        rs = self.reasoning
        if rs is None:
            return text
        return text[rs.content_from:] if rs.content_from is not None else ""

    def resume(self, sent: str) -> None:
        """Starts after text another server already streamed (a fleet router's failover)."""
        if self.reasoning is not None:
            self.reasoning.feed(sent, False)
        if self.calls is not None:
            self.calls.feed(self._answer(sent), False, complete=False)

    def feed(self, text: str, delta: str,
             reason: str | None) -> tuple[str, str, list[dict[str, Any]], str | None]:
        """(new reasoning, new content, tool-call deltas, finish reason) for the choice's whole
        text so far; delta: the text new in it, which is all content without a parser or tools."""
        thought, content, deltas = "", delta, []
        if self.reasoning is not None:
            thought, content = self.reasoning.feed(text, reason is not None)
        if self.calls is not None:
            assert self.tools is not None
            content, deltas = self.calls.feed(self._answer(text), reason is not None, complete=reason == "stop")
            if reason is not None:
                reason = tool_finish(self.tools, reason, self.calls.called)
        return thought, content, deltas, reason
