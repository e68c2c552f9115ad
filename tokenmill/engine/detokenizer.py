"""Incremental detokenization and stop-string matching.

Decoding a token at a time breaks multi-byte characters (a byte-level BPE token may hold
half of one) and word-boundary spaces (SentencePiece). We decode a short window of
tokens and only emit text once it no longer ends in the replacement character, the
approach vLLM and TGI use. Stop strings are searched in the new text plus a tail of the
old one, and the last len(longest stop) - 1 characters are held back from streaming
so that text that may start a stop string is never emitted and then taken back.
"""

from __future__ import annotations

from typing import Any

# How many prompt tokens to decode as left context for the first output tokens.
_PREFIX_CONTEXT = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool, stop: list[str],
                 include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.ids: list[int] = list(prompt_ids[-_PREFIX_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text decoded so far (stop string removed once matched)
        self.emitted = 0  # characters of `text` already handed out as deltas

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _window_text(self) -> str:
        """The text the tokens after read_offset add to the window's (ends in U+FFFD while they
        hold part of a character)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._decode(self.ids[self.prefix_offset :])[len(prefix) :]

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Appends a token; returns the stop string if one now appears in the text."""
        self.ids.append(token_id)
        new = self._window_text()
        if not new:
            return None
        if not new.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return self._append(new, check_stop)
        if check_stop and self.stop:
            # The new text ends in part of a character and waits for the rest, but what comes
            # before that part may already complete a stop string: it ends the text now.
            head = new.rstrip("\ufffd")
            if head:
                text = self.text
                hit = self._append(head)
                if hit is None:
                    self.text = text  # (still pending)
                return hit
        return None

    def pending_text(self) -> str:
        """The whole characters decoded but held back with a partial one after them."""
        if self.read_offset == len(self.ids):
            return ""
        return self._window_text().rstrip("\ufffd")

    def flush(self, check_stop: bool = True) -> str | None:
        """At the end of generation: emit whatever is still buffered (e.g. a broken final character).
        Returns the stop string it completes, if any (check_stop)."""
        if self.read_offset < len(self.ids):
            new = self._window_text()
            self.read_offset = len(self.ids)
            if new:
                return self._append(new, check_stop)
        return None

    def _append(self, new: str, check_stop: bool = True) -> str | None:
        old = len(self.text)
        self.text += new
        if not check_stop:
            return None
        # Only a stop string that ends in the new text: one that ended before it was either looked
        # for then, or lay in text that may not stop the output (min_tokens' first tokens).
        hits = [(idx, s) for s in self.stop if (idx := self.text.find(s, max(0, old - len(s) + 1))) != -1]
        if not hits:
            return None
        idx, s = min(hits)  # the earliest match wins
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def delta(self, finished: bool) -> str:
        """New text safe to stream now; everything remaining once finished."""
        limit = safe_stream_end(self.text, self.stop, finished, self.emitted)
        out = self.text[self.emitted : limit]
        self.emitted = limit
        return out


class FinalDetokenizer(IncrementalDetokenizer):
    """For a request reported only once finished (LLMEngine.add_request's final_only) with no stop
    strings to watch for: tokens are kept as they come and decoded once, when the text is first
    read (at the end), the same text the incremental decode gives (tests/test_detokenizer.py checks
    that the two agree). Incrementally each token costs two decodes of a short window, 6.4 µs with a
    49K byte-level BPE vocabulary, 1.6 ms a step at batch 256; once, about 0.25 µs a token."""

    def __init__(self, *args, **kwargs) -> None:
        self._text = ""
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def text(self) -> str:
        self.flush()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        self.ids.append(token_id)  # decoded by flush(), when the text is read
        return None


def token_string(tokenizer: Any, tid: int) -> str:
    """A token as logprobs show it: its decoded text, or its vocabulary string for a piece of a
    UTF-8 character (which decodes to U+FFFD: top-logprob entries would collide)."""
    s = tokenizer.decode([tid])
    return tokenizer.convert_ids_to_tokens(tid) if "\ufffd" in s else s


def safe_stream_end(text: str, stop: list[str], finished: bool, emitted: int) -> int:
    """How much of a sequence's text may be streamed: all of it once finished; before that,
    all but the last len(longest stop) - 1 characters, which may begin a stop string that
    would be cut from the final text (never less than what was already emitted)."""
    if finished or not stop:
        return len(text)
    return max(emitted, len(text) - (max(len(s) for s in stop) - 1))


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte's stand-in character in vocabulary strings."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_UNICODE = _byte_to_unicode()
