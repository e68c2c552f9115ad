"""One decoder-only transformer for Llama, Qwen2, Qwen3 and Mistral, driven by ModelConfig.

The model works on a flattened batch: `input_ids` and `positions` are [num_tokens], with
all scheduled sequences' tokens laid end to end; the attention backend uses the metadata to
keep sequences apart and to read earlier context from the paged KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.config import ModelConfig
from tokenmill.kernels import elementwise_ops, ops_for
from tokenmill.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope, rope_and_cache
from tokenmill.model.linear import KERNEL_MAX_ROWS, Embedding, Linear, linear, native_bf16


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v fused into one matmul (the loader concatenates them).
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        # On CUDA RoPE's kernel also writes k and v into the cache (when the backend takes it so).
        write = self.backend.takes_written_cache
        if self.q_norm is None:
            # q and k sit side by side in qkv: rotate them as one [T, heads + kv_heads, D] tensor.
            qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
            written = write and rope_and_cache(qk, *rope, v, kv_cache, meta.slot_mapping, self.num_heads)
            if not written:
                qk = apply_rope(qk, *rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = qkv[:, : self.q_size].reshape(t * self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].reshape(t * self.num_kv_heads, self.head_dim)
            q = apply_rope(self.q_norm(q).view(t, self.num_heads, self.head_dim), *rope)
            k = self.k_norm(k).view(t, self.num_kv_heads, self.head_dim)
            written = write and rope_and_cache(k, *rope, v, kv_cache, meta.slot_mapping, 0)
            if not written:
                k = apply_rope(k, *rope)
        if written:
            out = self.backend.forward(q, k, v, kv_cache, meta, self.sliding_window, cache_written=True)
        else:
            out = self.backend.forward(q, k, v, kv_cache, meta, self.sliding_window)
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, rope, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        if cfg.tie_word_embeddings or not cfg.has_lm_head:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # A sequence classifier's head (transformers' `score`, or the loader's rows of the LM head for
        # classifier_from_token): a plain nn.Linear, which quantization leaves alone (a few rows),
        # applied in float32 to the last token's hidden state.
        self.score = nn.Linear(cfg.hidden_size, len(cfg.labels), bias=False) if cfg.labels else None
        self.backend = backend
        # Steps of short chunks run the layers from C++ (cpu_ops Decoder); False forces this module's
        # own path (tests compare the two). The Decoder binds the weights on first use.
        self.use_fused = True
        self._fused = None

    def reset_fused(self) -> None:
        """Drops the C++ decoder's weight bindings (call after replacing weights, and after
        `linear.prepack_model` again if the model was prepacked: the copies do not follow edits)."""
        self._fused = None

    def _fused_decoder(self, x: torch.Tensor, meta: AttentionMetadata):
        """The C++ decoder when this step can use it: CPU kernels, the `cpu` attention backend, and
        every chunk short enough for the paged-attention kernel (what the Python path would do too)."""
        if not self.use_fused or self.backend.name != "cpu" or meta.max_query_len > self.backend.max_kernel_query_len:
            return None
        ops = ops_for(x)
        if ops is None:
            return None
        if self._fused is None:
            self._fused = self._build_fused(ops)
        return self._fused

    def _build_fused(self, ops):
        cfg = self.config
        dec = ops.Decoder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, self.backend.scale,
                          self.norm.weight, KERNEL_MAX_ROWS[torch.float32], KERNEL_MAX_ROWS[torch.bfloat16],
                          KERNEL_MAX_ROWS[torch.int8], native_bf16())
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            dec.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                          a.q_norm.weight if a.q_norm is not None else None,
                          a.k_norm.weight if a.k_norm is not None else None,
                          *_lin(a.qkv_proj), *_lin(a.o_proj), *_lin(m.gate_up_proj), *_lin(m.down_proj),
                          a.sliding_window or 0)
        return dec

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns final hidden states [num_tokens, hidden]; `compute_logits` turns chosen rows into logits."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.table(positions)
        fused = self._fused_decoder(x, meta)
        if fused is not None:
            return fused.forward(x, *rope, kv_caches, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                 meta.query_start_loc)
        ops = elementwise_ops(x)
        if ops is not None and hasattr(ops, "add_rms_norm") and len(self.layers):
            return self._forward_fused_norms(ops, x, rope, kv_caches, meta)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, rope, cache, meta)
        return self.norm(x)

    def _forward_fused_norms(self, ops, x, rope, kv_caches, meta) -> torch.Tensor:
        """The layers with each residual sum fused into the norm after it (add_rms_norm, on CUDA):
        the same values, two kernels a layer fewer."""
        h = self.layers[0].input_layernorm(x)
        norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, cache, nxt in zip(self.layers, kv_caches, norms):
            post = layer.post_attention_layernorm
            x, h = ops.add_rms_norm(x, layer.self_attn(h, rope, cache, meta), post.weight, post.eps)
            x, h = ops.add_rms_norm(x, layer.mlp(h), nxt.weight, nxt.eps)
        return h

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pooling models' output for their prompts' last hidden states [n, hidden]: a classifier's
        scores (its head's logits in float32, through the activation its problem_type implies, as
        vLLM's: none for regression, a sigmoid each for multi-label, else a sigmoid for one label
        and a softmax for several), else the L2-normalized embedding."""
        if self.score is None:
            return nn.functional.normalize(hidden.float(), dim=-1)
        logits = nn.functional.linear(hidden.float(), self.score.weight.float())
        kind = self.config.problem_type
        if kind == "regression":
            return logits
        if kind == "multi_label_classification" or logits.shape[-1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return linear(hidden, head.weight, head.scale, packed=head.packed)


def _lin(m: Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    return m.weight, m.scale, m.bias, m.packed
