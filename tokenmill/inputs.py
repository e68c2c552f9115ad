"""vLLM's prompt dicts (`from vllm import TokensPrompt`): typed names for what generate already takes."""

from __future__ import annotations

from typing import TypedDict


class _Text(TypedDict):
    prompt: str


class TextPrompt(_Text, total=False):
    cache_salt: str


class _Tokens(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_Tokens, total=False):
    prompt: str  # its text, when known (then the output's .prompt)
    cache_salt: str
