"""Attention backends: one small interface, implementations registered by name."""

from tokenmill.attention import torch_backend as _torch_backend  # noqa: F401  (registers "torch")
from tokenmill.attention import triton_backend as _triton_backend  # noqa: F401  ("triton"; imports triton when used)
from tokenmill.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    get_attention_backend,
    register_attention_backend,
)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "get_attention_backend",
    "register_attention_backend",
]
