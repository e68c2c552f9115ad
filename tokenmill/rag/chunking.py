"""A file's text cut into overlapping token windows, as OpenAI's vector stores chunk files.

OpenAI's "auto" strategy is windows of 800 tokens overlapping by 400; "static" sets both
(max_chunk_size_tokens in [100, 4096], chunk_overlap_tokens at most half of it). Tokens are the
embedding model's, so a chunk always fits it; each chunk's text is the exact slice of the file that
its tokens cover (the fast tokenizer's offsets), not a decode, so what is searched and shown is
what the file says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AUTO_MAX_TOKENS = 800
AUTO_OVERLAP_TOKENS = 400


@dataclass(frozen=True)
class Chunking:
    max_tokens: int = AUTO_MAX_TOKENS
    overlap_tokens: int = AUTO_OVERLAP_TOKENS

    @classmethod
    def from_request(cls, strategy: Any, where: str = "chunking_strategy") -> Chunking:
        """OpenAI's chunking_strategy ({"type": "auto"} or {"type": "static", "static": {...}})."""
        if strategy is None:
            return cls()
        if not isinstance(strategy, dict):
            raise ValueError(f"{where}: must be an object with a type")
        kind = strategy.get("type")
        if kind == "auto":
            return cls()
        if kind != "static":
            raise ValueError(f"{where}.type: must be 'auto' or 'static', got {kind!r}")
        s = strategy.get("static")
        if not isinstance(s, dict):
            raise ValueError(f"{where}.static: is required with type static")
        size, overlap = s.get("max_chunk_size_tokens"), s.get("chunk_overlap_tokens")
        if not isinstance(size, int) or isinstance(size, bool) or not 100 <= size <= 4096:
            raise ValueError(f"{where}.static.max_chunk_size_tokens: must be an integer in [100, 4096], got {size!r}")
        if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap <= size // 2:
            raise ValueError(f"{where}.static.chunk_overlap_tokens: must be an integer in [0, "
                             f"max_chunk_size_tokens / 2 = {size // 2}], got {overlap!r}")
        return cls(size, overlap)

    def as_object(self) -> dict[str, Any]:
        """As OpenAI shows it on a vector store file (auto shows as the static values it means)."""
        return {"type": "static", "static": {"max_chunk_size_tokens": self.max_tokens,
                                             "chunk_overlap_tokens": self.overlap_tokens}}

    def fitted(self, limit: int) -> Chunking:
        """This strategy for an embedding model that reads at most `limit` tokens a chunk (its
        context, less its special tokens): a ValueError where a static size does not fit."""
        if self.max_tokens <= limit:
            return self
        if (self.max_tokens, self.overlap_tokens) != (AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS):
            raise ValueError(f"chunking_strategy.static.max_chunk_size_tokens: the embedding model reads at most "
                             f"{limit} tokens a chunk, got {self.max_tokens}")
        return Chunking(limit, min(self.overlap_tokens, limit // 2))


def chunk_text(tokenizer: Any, text: str, chunking: Chunking) -> list[str]:
    """The text's chunks: windows of chunking.max_tokens tokens, each starting max - overlap
    tokens after the last, as slices of the text; the last window ends at the text's end."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]  # (tokens that cover no text: nothing to cut at)
    if not offsets:
        return [text] if text.strip() else []
    size, step = chunking.max_tokens, chunking.max_tokens - chunking.overlap_tokens
    chunks = []
    start = 0
    while True:
        end = min(start + size, len(offsets))
        piece = text[offsets[start][0]:offsets[end - 1][1]]
        if piece.strip():
            chunks.append(piece)
        if end == len(offsets):
            return chunks
        start += step
