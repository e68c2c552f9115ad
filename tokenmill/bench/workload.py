"""Synthetic workloads and random models for benchmarks (nothing is downloaded)."""

from __future__ import annotations

import os
import random

SMOLLM_135M_SHAPE = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
)


def make_random_model(path: str, seed: int = 0, **shape) -> str:
    """Saves a random Llama-architecture checkpoint of the given shape (SmolLM-135M's by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cfg = LlamaConfig(**{**SMOLLM_135M_SHAPE, **shape})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


def save_synthetic_tokenizer(path: str, vocab_size: int, seed: int = 0) -> None:
    """Writes a tokenizer whose every id decodes to a distinct word (" lorem", " vatu", ...), so
    benchmarks on random models stream real text and pay real detokenization costs. Prompts are
    sent as token ids; the vocabulary is invented, since nothing may be downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
        vocab.setdefault(("\u0120" if rng.random() < 0.8 else "") + word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        path)
