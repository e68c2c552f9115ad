"""Synthetic workloads and random models for benchmarks (nothing is downloaded)."""

from __future__ import annotations

import os
import random

SMOLLM_135M_SHAPE = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
)


# Published models' shapes (their config.json's figures), for benchmarks with random weights.
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm-135m": ("llama", SMOLLM_135M_SHAPE),
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0,
        rms_norm_eps=1e-6)),
    "llama3-8b": ("llama", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
        rope_theta=500000.0, rms_norm_eps=1e-5)),
}


def make_random_model(path: str, seed: int = 0, shape_name: str = "smollm-135m", weights: bool = True,
                      **shape) -> str:
    """Saves a random checkpoint of a published shape (SmolLM-135M's by default; `shape` overrides
    figures). Without weights only config.json is written: for load_format "dummy", where an 8B
    shape's random checkpoint would take minutes and 16 GB to write."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)}")
    model_type, figures = SHAPES[shape_name]
    cfg = AutoConfig.for_model(model_type, **{**figures, **shape})
    if not weights:
        cfg.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]]
        os.makedirs(path, exist_ok=True)
        cfg.save_pretrained(path)
        return path
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
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
