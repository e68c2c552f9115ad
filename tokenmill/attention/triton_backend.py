"""`triton`: a Triton kernel for paged attention (issue 16).

The backend sends a step's decodes to it (one launch, which a CUDA graph can hold) and its
prefill chunks to PyTorch's SDPA (`kernel_prefill` sends those to the kernel too). The kernel
handles decodes and prefill chunks, with or without earlier context in the cache, in one
launch: one program per (sequence, query head, block of BLOCK_M query rows), which walks the
sequence's block table a KV block at a time with an online softmax (FlashAttention's), masking
causally from the row's position (context length - query length + row) and by the sliding
window. The KV cache is read in place; nothing is gathered or padded. GQA: query head h reads
KV head h // (num_heads // num_kv_heads).

Its logic is tested on the CPU under Triton's interpreter (TRITON_INTERPRET=1) against the torch
backend; on a GPU the same source compiles.
"""

from __future__ import annotations

import torch

from tokenmill.attention.backend import AttentionMetadata, register_attention_backend
from tokenmill.attention.torch_backend import TorchAttentionBackend

_kernel = None


def _get_kernel():
    """Compiles (defines) the kernel on first use, so that importing tokenmill needs no triton."""
    global _kernel
    if _kernel is not None:
        return _kernel
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("attention_backend 'triton' needs the triton package (pip install triton)") from e

    @triton.jit
    def paged_attention(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
        query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
        scale, window,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_ot, stride_oh,
        stride_bt,
        num_queries_per_kv: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        mblock = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        if mblock * BLOCK_M >= q_len:
            return
        ctx = tl.load(seq_lens_ptr + seq)
        kv_head = head // num_queries_per_kv

        rows = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        pos = ctx - q_len + rows  # each query row's position in the sequence
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys a row may see: [pos - window + 1, pos]; the block loop starts at the first row's.
        lo = ctx * 0  # int64 like ctx: the compiler wants one type on both sides of the branch
        if window > 0:  # from the window of this program's first row
            lo = tl.maximum(ctx - q_len + mblock * BLOCK_M - window + 1, 0)
            lo = (lo // BLOCK_SIZE) * BLOCK_SIZE
        hi = tl.minimum(ctx, ctx - q_len + (mblock + 1) * BLOCK_M)  # the block's last row's position + 1
        offs = tl.arange(0, BLOCK_SIZE)
        for start in range(lo, hi, BLOCK_SIZE):
            block = tl.load(block_tables_ptr + seq * stride_bt + start // BLOCK_SIZE)
            kpos = start + offs
            k_ok = kpos < ctx
            kv_off = block * stride_kb + offs[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # not TF32: float32 parity
            allowed = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
            if window > 0:
                allowed = allowed & (kpos[None, :] > pos[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf: subtract 0 there, not -inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    _kernel = paged_attention
    return _kernel


@register_attention_backend
class TritonAttentionBackend(TorchAttentionBackend):
    """The kernel for the step's decodes (a decode-only step is one launch per layer, which a CUDA
    graph can hold); prefill chunks, with or without cached context, go to PyTorch's SDPA as in the
    `torch` backend, whose flash kernels use the tensor cores (this kernel's fp32 dots do not).
    `kernel_prefill` sends them to the kernel too (one launch for the whole step)."""

    name = "triton"
    BLOCK_M = 16
    kernel_prefill = False

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        bs = meta.block_size
        if bs & (bs - 1) or bs < 16:  # tl.arange and tl.dot want powers of two, at least 16
            raise ValueError(f"attention_backend 'triton': block_size must be a power of two >= 16, got {bs}")
        k_cache, v_cache, flat_k, flat_v = self._write_cache(k, v, kv_cache, meta)
        if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
            raise ValueError("attention_backend 'triton': q and the KV cache must be contiguous in head_dim")
        out = torch.empty_like(q)
        if meta.num_seqs == 0:
            return out
        seqs = meta.num_seqs if self.kernel_prefill else meta.num_decodes
        if seqs:
            rows = meta.max_query_len if seqs > meta.num_decodes else 1
            self._launch(q, k_cache, v_cache, out, meta, seqs, rows, sliding_window)
        self._prefill_chunks(out, q, k, v, flat_k, flat_v, meta, seqs, sliding_window)
        return out

    def _launch(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                meta: AttentionMetadata, seqs: int, max_rows: int, window: int | None) -> None:
        """The kernel over the first `seqs` sequences of the step (their rows are the first ones). It
        launches on the current device: the model runner makes that the model's (ModelRunner.on_device)."""
        import triton

        kernel = _get_kernel()
        grid = (seqs, self.num_heads, triton.cdiv(max_rows, self.BLOCK_M))
        kernel[grid](
            q, k_cache, v_cache, out,
            meta.query_start_loc, meta.seq_lens, meta.block_tables,
            self.scale, window or 0,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            out.stride(0), out.stride(1),
            meta.block_tables.stride(0),
            num_queries_per_kv=self.num_heads // self.num_kv_heads,
            HEAD_DIM=self.head_dim, BLOCK_D=max(16, triton.next_power_of_2(self.head_dim)),
            BLOCK_M=self.BLOCK_M, BLOCK_SIZE=meta.block_size,
        )
