"""Tiny random checkpoints written with transformers' save_pretrained (no downloads)."""

from __future__ import annotations

import os

import torch

VOCAB = 512

# A small corpus for the test tokenizer, with multi-byte characters so that tokens split them.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! How are you today? I am fine, thank you.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Café crème brûlée, naïve façade, Zürich, São Paulo.",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 😀 🚀 🎉 ✨ 👍🏽 and math: ∑ ∫ √ ≤ ≥ π.",
    "Stop here. STOP. The end is near; the end is here.",
]

# A minimal ChatML-like template, so the chat endpoint can be tested on the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

# A Qwen-like template that shows tools and writes calls as Hermes' <tool_call> blocks.
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}<s>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call></s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

ARCH_CONFIGS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128},
    ),
    "llama_tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True,
                       num_key_value_heads=4),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096),
}


def make_model(path: str, arch: str = "llama", *, seed: int = 0, tokenizer: bool = True, shard: str | None = None,
               chat_template: str = CHAT_TEMPLATE, **overrides) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCH_CONFIGS[arch])
    model_type = spec.pop("model_type")
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.08, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    base.update(spec)
    base.update(overrides)
    cfg = AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    if tokenizer:
        save_tokenizer(path, chat_template)
    return path


def save_tokenizer(path: str, chat_template: str = CHAT_TEMPLATE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = chat_template
    fast.save_pretrained(path)


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()
