"""The attention backend interface and the metadata the model runner hands to it.

The runner lays out a step's tokens as [decode tokens | prefill chunks]: the first
`num_decode_tokens` rows are single-token decodes, one per sequence, and each
`PrefillSpan` after them is a chunk of one sequence's prompt (possibly with earlier
context already in the cache). Everything a kernel needs is in this object; nothing is
read from globals, so a faster backend only has to implement `forward`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PrefillSpan:
    start: int  # first row of this chunk in the flattened batch
    query_len: int  # tokens in this chunk
    context_len: int  # tokens of this sequence in the cache once the chunk is written
    block_table: torch.Tensor  # [num_blocks] int64, blocks covering context_len tokens

    @property
    def num_cached_before(self) -> int:
        return self.context_len - self.query_len


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset)
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with block 0
    decode_seq_lens: torch.Tensor  # [num_decodes] int64, context length including the new token
    decode_max_seq_len: int
    prefills: list[PrefillSpan]
    block_size: int
    # Per-step scratch that backends may fill once and reuse in every layer (masks, indices).
    scratch: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


class AttentionBackend(ABC):
    """Computes attention over the paged KV cache for one layer.

    `kv_cache` is [2, num_blocks, block_size, num_kv_heads, head_dim] (keys, values).
    The backend writes this step's k and v into the cache and returns
    [num_tokens, num_heads, head_dim].
    """

    name: str = ""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_attention_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _REGISTRY[cls.name] = cls
    return cls


def get_attention_backend(name: str) -> type[AttentionBackend]:
    if name not in _REGISTRY:
        raise ValueError(f"attention_backend: unknown backend {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
