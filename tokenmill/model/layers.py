"""Building blocks of a Llama-style decoder, numerically matching Hugging Face's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import RopeConfig
from tokenmill.kernels import elementwise_ops
from tokenmill.model.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = elementwise_ops(x)
        if ops is not None and x.dim() == 2:
            return ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE with a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.rope = head_dim, max_positions, rope
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)

    def reset_table(self) -> None:
        """Fills the float32 cos/sin table (after the model is materialised on its device)."""
        device = self.cos.device
        inv_freq = rope_inv_freq(self.head_dim, self.rope).to(device)
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin rows [T, D] for the tokens' positions (looked up once per step)."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x: [T, heads, D], in place when the fused op is there (returns x)."""
    ops = elementwise_ops(x)
    if ops is not None and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        ops.rope_(x, cos, sin)
        return x
    c = cos.to(x.dtype)[:, None, :]
    s = sin.to(x.dtype)[:, None, :]
    return x * c + _rotate_half(x) * s


def rope_and_cache(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slots: torch.Tensor, num_q_heads: int) -> bool:
    """RoPE of x [T, heads, D] in place, its heads from num_q_heads on (keys) written rotated into
    kv_cache [2, blocks, block_size, kv_heads, D] at their tokens' slots with v's beside them, in one
    kernel where the fused op is there (CUDA). False where it is not: nothing is done, the caller
    rotates and the attention backend writes the cache."""
    ops = elementwise_ops(x)
    if (ops is None or not getattr(ops, "ROPE_WRITES_CACHE", False) or x.stride(2) != 1 or x.stride(1) != x.shape[2]
            or kv_cache.dtype != x.dtype or v.dtype != x.dtype or not kv_cache.is_contiguous()):
        return False
    ops.rope_(x, cos, sin, (v, kv_cache[0], kv_cache[1], slots), num_q_heads)
    return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SwiGLU(nn.Module):
    """gate_proj and up_proj fused into one matmul (the loader concatenates them)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = elementwise_ops(x)
        if ops is not None:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)
