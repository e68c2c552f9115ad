"""The attention backend interface and the metadata the model runner hands to it.

The metadata has the varlen form fast kernels take (FlashAttention's, vLLM's): a step's
sequences in one order, each owning a contiguous run of query rows
(`query_start_loc[i]:query_start_loc[i+1]`), a context length once this step's tokens are
in the cache (`seq_lens`), and one block table per sequence. Sequences with one query row
(decodes) come first (`num_decodes` of them), then prefill chunks, which may have earlier
context in the cache. The model runner builds it once per step; tensors live on the device,
and the `_cpu` lists are the same figures for Python-side loops. Nothing is read from
globals, so a faster backend only has to implement `forward`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of each row
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64: first query row of each sequence
    seq_lens: torch.Tensor  # [num_seqs] int64: context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64; past a sequence's context: any valid block
    num_decodes: int  # the first num_decodes sequences have exactly one query row
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Per-step scratch that backends may fill once and reuse in every layer (masks, indices).
    scratch: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes  # one row each, and they come first

    def query_len(self, i: int) -> int:
        return self.query_start_loc_cpu[i + 1] - self.query_start_loc_cpu[i]


class AttentionBackend(ABC):
    """Computes attention over the paged KV cache for one layer.

    `kv_cache` is [2, num_blocks, block_size, num_kv_heads, head_dim] (keys, values).
    The backend writes this step's k and v into the cache and returns
    [num_tokens, num_heads, head_dim].
    """

    name: str = ""
    # Whether forward takes cache_written=True: the step's keys and values are already in kv_cache
    # (written by the RoPE kernel, model/layers.rope_and_cache), so it must not write them again.
    takes_written_cache: bool = False

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
