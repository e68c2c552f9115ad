"""Portable paged attention in plain PyTorch (CPU and CUDA), and the CPU backend.

`torch`: decodes are batched: their context is gathered from the cache into a padded
[batch, max_len] tensor and masked. Prefill chunks run one sequence at a time with
scaled_dot_product_attention; a chunk with no earlier context uses its own fresh k/v
and skips the gather.

`cpu`: decodes and short chunks (up to 16 query rows: speculative verification, the tail of
a prompt) go to tokenmill's paged-attention kernel, which reads the cache in place with no
padding (tokenmill/csrc/cpu_ops.cpp); long prefill chunks keep PyTorch's flash kernel,
which is compute-bound and does well. Where the kernel cannot be built it is `torch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, register_attention_backend
from tokenmill.kernels import ops_for


@register_attention_backend
class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._buffers: dict[str, torch.Tensor] = {}

    takes_written_cache = True

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None = None,
        cache_written: bool = False,
    ) -> torch.Tensor:
        k_cache, v_cache, flat_k, flat_v = self._write_cache(k, v, kv_cache, meta, cache_written)

        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, sliding_window)
        self._prefill_chunks(out, q, k, v, flat_k, flat_v, meta, nd, sliding_window)
        return out

    def _prefill_chunks(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        flat_k: torch.Tensor, flat_v: torch.Tensor, meta: AttentionMetadata, first: int,
                        window: int | None) -> None:
        """Sequences first.. of the step, one at a time through SDPA, into their rows of out."""
        qsl = meta.query_start_loc_cpu
        for i in range(first, meta.num_seqs):
            rows = slice(qsl[i], qsl[i + 1])
            out[rows] = self._prefill(q[rows], k[rows], v[rows], flat_k, flat_v, i, meta, window)

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                     written: bool = False):
        """Writes this step's k and v into their slots (unless they are already: `written`); returns
        the caches and their flat views."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if not written:
            flat_k.index_copy_(0, meta.slot_mapping, k)
            flat_v.index_copy_(0, meta.slot_mapping, v)
        return k_cache, v_cache, flat_k, flat_v

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        window: int | None,
    ) -> torch.Tensor:
        b = q.shape[0]
        tables = self._decode_tables(meta)
        length = tables.shape[1] * meta.block_size
        # Gather each sequence's blocks into reused buffers (fresh large allocations cost page
        # faults on every layer), then let SDPA read the [b, kvh, L, d] views without copies.
        idx = tables.flatten()
        kbuf = self._buffer("k", k_cache, idx.numel())
        vbuf = self._buffer("v", v_cache, idx.numel())
        torch.index_select(k_cache, 0, idx, out=kbuf)
        torch.index_select(v_cache, 0, idx, out=vbuf)
        keys = kbuf.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        vals = vbuf.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = self._decode_mask(meta, window)  # [b, 1, 1, L]
        out = F.scaled_dot_product_attention(
            q.view(b, self.num_heads, 1, self.head_dim), keys, vals, attn_mask=mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.view(b, self.num_heads, self.head_dim)

    def _buffer(self, name: str, like: torch.Tensor, blocks: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < blocks or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty((max(blocks, 1),) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:blocks]

    @staticmethod
    def _decode_tables(meta: AttentionMetadata) -> torch.Tensor:
        """The decodes' block tables, padded to the longest decode (not to the longest prefill)."""
        tables = meta.scratch.get("decode_tables")
        if tables is None:
            blocks = max(-(-n // meta.block_size) for n in meta.seq_lens_cpu[: meta.num_decodes])
            tables = meta.scratch["decode_tables"] = meta.block_tables[: meta.num_decodes, :blocks]
        return tables

    @classmethod
    def _decode_mask(cls, meta: AttentionMetadata, window: int | None) -> torch.Tensor:
        key = ("decode_mask", window)
        mask = meta.scratch.get(key)
        if mask is None:
            lens = meta.seq_lens[: meta.num_decodes]
            length = cls._decode_tables(meta).shape[1] * meta.block_size
            pos = torch.arange(length, device=lens.device)
            mask = pos[None, :] < lens[:, None]
            if window is not None:
                mask &= pos[None, :] >= (lens[:, None] - window)
            mask = mask[:, None, None, :]
            meta.scratch[key] = mask
        return mask

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        flat_k: torch.Tensor,
        flat_v: torch.Tensor,
        i: int,
        meta: AttentionMetadata,
        window: int | None,
    ) -> torch.Tensor:
        query_len, context_len = meta.query_len(i), meta.seq_lens_cpu[i]
        cached = context_len - query_len
        if cached == 0:
            keys, vals = k, v
        else:
            idx = meta.scratch.get(("prefill_slots", i))
            if idx is None:  # the same in every layer: build once per step
                bs = meta.block_size
                table = meta.block_tables[i, : -(-context_len // bs)]
                idx = (table[:, None] * bs + torch.arange(bs, device=q.device)).flatten()
                idx = meta.scratch[("prefill_slots", i)] = idx[:context_len]
            keys, vals = flat_k[idx], flat_v[idx]
        # [1, heads, tokens, head_dim]: with a batch dimension PyTorch's CPU SDPA takes its flash
        # kernel (GQA and masks included); 3-D inputs fall back to the math path, 2-5x slower.
        qt, kt, vt = q.transpose(0, 1)[None], keys.transpose(0, 1)[None], vals.transpose(0, 1)[None]
        gqa = self.num_heads != self.num_kv_heads
        if cached == 0 and window is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            mask = meta.scratch.get(("prefill_mask", i, window))
            if mask is None:
                qpos = torch.arange(cached, cached + query_len, device=q.device)
                kpos = torch.arange(context_len, device=q.device)
                allowed = kpos[None, :] <= qpos[:, None]
                if window is not None:
                    allowed &= kpos[None, :] > (qpos[:, None] - window)
                # An additive float mask: the flash kernel handles it faster than a boolean one.
                mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
                meta.scratch[("prefill_mask", i, window)] = mask
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)


@register_attention_backend
class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"
    takes_written_cache = False
    # Chunks up to this many query rows use the kernel; longer ones PyTorch's flash attention.
    max_kernel_query_len = 16

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        ops = ops_for(q)
        if ops is None:
            return super().forward(q, k, v, kv_cache, meta, sliding_window)
        k_cache, v_cache, flat_k, flat_v = self._write_cache(k, v, kv_cache, meta)
        window = sliding_window or 0
        groups = self._groups(meta)
        if len(groups) == 1 and groups[0][0] == "kernel" and groups[0][1] == 0 and groups[0][2] == meta.num_seqs:
            return ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                       self.scale, window)
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        for kind, first, last in groups:
            rows = slice(qsl[first], qsl[last])
            if kind == "kernel":
                out[rows] = ops.paged_attention(
                    q[rows], k_cache, v_cache, meta.block_tables[first:last], meta.seq_lens[first:last],
                    meta.query_start_loc[first : last + 1] - qsl[first], self.scale, window)
            else:
                out[rows] = self._prefill(q[rows], k[rows], v[rows], flat_k, flat_v, first, meta, sliding_window)
        return out

    def _groups(self, meta: AttentionMetadata) -> list[tuple[str, int, int]]:
        """Runs of consecutive sequences for the kernel, and single long chunks for SDPA (once per step)."""
        groups = meta.scratch.get("cpu_groups")
        if groups is None:
            groups = []
            for i in range(meta.num_seqs):
                if meta.query_len(i) <= self.max_kernel_query_len:
                    if groups and groups[-1][0] == "kernel" and groups[-1][2] == i:
                        groups[-1] = ("kernel", groups[-1][1], i + 1)
                    else:
                        groups.append(("kernel", i, i + 1))
                else:
                    groups.append(("sdpa", i, i + 1))
            meta.scratch["cpu_groups"] = groups
        return groups
