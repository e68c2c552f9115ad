"""Writes a Llama-architecture Hugging Face folder as GGUF, so llama.cpp runs the same weights.

For benchmarks only: llama.cpp's own convert_hf_to_gguf.py refuses tokenizers it does not
know (our benchmark models have synthetic ones), so this writes the file directly with the
`gguf` package (`pip install gguf`): the weights (q/k rows permuted to llama.cpp's rotary
layout, as its converter does), the hyperparameters, and the vocabulary as a byte-level BPE
token list without merges (benchmarks send token ids, so nothing is tokenized).

    python -m tokenmill.bench.gguf_export HF_DIR OUT.gguf --outtype f32|bf16|q8_0
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export(hf_dir: str, out_path: str, outtype: str = "f32") -> str:
    import gguf
    from safetensors.numpy import load_file

    from tokenmill.model.loader import checkpoint_files

    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "llama":
        raise ValueError(f"gguf_export: only llama checkpoints are supported, got {cfg.get('model_type')!r}")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

    w = gguf.GGUFWriter(out_path, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type({"f32": 0, "bf16": 32, "q8_0": 7}[outtype])

    tokens = [f"<tok{i}>" for i in range(cfg["vocab_size"])]
    tok_file = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(tok_file):
        with open(tok_file) as f:
            vocab = json.load(f)["model"]["vocab"]
        for text, i in vocab.items():
            if i < len(tokens):
                tokens[i] = text
    # llama.cpp's BPE vocabulary wants a newline token; the last id becomes one.
    tokens[-1] = "\u010a"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(["\u010a \u010a"])  # llama.cpp needs the key; an empty list is not written
    w.add_bos_token_id(cfg.get("bos_token_id") or 1)
    w.add_eos_token_id(cfg.get("eos_token_id") or 2)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    tensors: dict[str, np.ndarray] = {}
    for file in checkpoint_files(hf_dir):
        tensors.update(load_file(file))
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            out = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module>.weight
            out = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
            if parts[3:-1] == ["self_attn", "q_proj"]:
                t = _permute(t, n_head)
            elif parts[3:-1] == ["self_attn", "k_proj"]:
                t = _permute(t, n_kv)
        if t.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
            w.add_tensor(out, t)
        else:
            data = gguf.quants.quantize(t, qtype)
            w.add_tensor(out, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--outtype", default="f32", choices=["f32", "bf16", "q8_0"])
    a = p.parse_args()
    print(export(a.model, a.out, a.outtype))


if __name__ == "__main__":
    main()
