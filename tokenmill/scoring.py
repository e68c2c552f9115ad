"""Scoring pairs of texts (vLLM's /score and /rerank, and LLM.score), shared by the server and the
offline API.

Two kinds of model score a pair, as in vLLM:
- an embedding model (task "embed"): the cosine similarity of the two texts' embeddings, each
  distinct text embedded once (a query against 100 documents is 101 prompts);
- a one-label classifier (task "classify": a cross-encoder reranker saved as
  *ForSequenceClassification, or a causal LM reranker given classifier_from_token, Qwen3-Reranker's
  way): the pair read as one prompt, the tokenizer's pair encoding of the two texts (plain
  concatenation for Qwen's tokenizers; Llama 3's puts its BOS before each), scored by its label's
  probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ScoreText = str | list[int]  # a text, or its token ids


def pair_indices(n1: int, n2: int, names: tuple[str, str] = ("text_1", "text_2")) -> list[tuple[int, int]]:
    """The (first, second) index pairs to score, vLLM's rule: one first text against every
    second one, or as many of each, paired in order."""
    if n1 == 0 or n2 == 0:
        raise ValueError(f"{names[0] if n1 == 0 else names[1]}: no texts to score")
    if n1 == 1:
        return [(0, j) for j in range(n2)]
    if n1 != n2:
        raise ValueError(f"{names[0]}: {n1} texts against {n2} in {names[1]}; give one, or as many as {names[1]}")
    return [(i, i) for i in range(n1)]


def pair_ids(tokenizer: Any, a: ScoreText, b: ScoreText, max_length: int | None) -> list[int]:
    """A cross-encoder's prompt for a pair: the tokenizer's pair encoding of two texts, or two
    token-id lists end to end; with max_length, cut to that many tokens the longer text first, from
    its end (transformers' longest_first). The cut is made here, not by the tokenizer: its
    truncation setting is the shared tokenizer's state, which other threads' encodes would see."""
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)):
            raise ValueError("a pair is two texts or two token-id lists, not one of each")
        ids, seq = a + b, [0] * len(a) + [1] * len(b)
    else:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; send token ids")
        enc = tokenizer(a, b, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if max_length is None or len(ids) <= max_length:
            return ids
        seq = enc.sequence_ids()  # (0: the first text's tokens, 1: the second's, None: special tokens)
    if max_length is None or len(ids) <= max_length:
        return ids
    lens = [seq.count(0), seq.count(1)]
    special = len(ids) - sum(lens)
    if max_length <= special:
        raise ValueError(f"truncate_prompt_tokens: {max_length} tokens leave no room for the texts beside the "
                         f"pair's {special} special tokens")
    lens = _longest_first(lens[0], lens[1], max_length - special)
    seen = [0, 0]
    out = []
    for t, s in zip(ids, seq):
        if s is None:
            out.append(t)
        elif seen[s] < lens[s]:
            seen[s] += 1
            out.append(t)
    return out


def _longest_first(a: int, b: int, budget: int) -> list[int]:
    """The two texts' lengths once cut to `budget` tokens as Hugging Face's fast tokenizers cut a pair
    (tokenizers' LongestFirst): the longer alone while the shorter fits beside it, else each to half
    (the odd token to the longer)."""
    n1, n2 = sorted((a, b))
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    if a > b:
        n1, n2 = n2, n1
    return [min(a, n1), min(b, n2)]


def cosine(u: Sequence[float], v: Sequence[float]) -> float:
    """Cosine similarity (embeddings come L2-normalized; dividing again keeps it exact for any vector)."""
    dot = sum(x * y for x, y in zip(u, v))
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(y * y for y in v))
    return max(-1.0, min(1.0, dot / (nu * nv))) if nu and nv else 0.0  # (rounding can pass 1)


def check_scorer(task: str, num_labels: int, name: str) -> None:
    """ValueError unless the model scores pairs: an embedding model or a one-label classifier."""
    if task == "embed" or (task == "classify" and num_labels == 1):
        return
    if task == "classify":
        raise ValueError(f"`{name}` is a classifier with {num_labels} labels; scoring a pair needs one relevance "
                         f"label (a reranker) or an embedding model")
    raise ValueError(f"`{name}` is served as a generative model, which scores no pairs; serve an embedding model "
                     f"or a reranker (a *ForSequenceClassification checkpoint, or a causal LM reranker with "
                     f"--classifier-from-token no,yes)")
