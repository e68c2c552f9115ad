"""`triton`: Triton kernels for paged attention (issue 16).

Decodes go to `paged_decode` (flash decoding): one program per (sequence, KV head, split of the
context). The query heads that share a KV head (GQA) are the rows of one tile, so each key and
value is read once for all of them and the dots are matrix products (padded to 16 rows: the tensor
cores' smallest). The program walks its split of the context BLOCK_N keys at a time, whatever the
block size (a tile's keys gather their blocks from the table), with an online softmax
(FlashAttention's); with more than one split, `combine_splits` merges the splits' partial sums
(max-rescaled). Splits exist so that a small batch still fills the device: 8 KV heads of one
sequence are 8 programs, where an H200 has 132 SMs. Their number depends on the batch size and
the longest context the metadata allows (for a CUDA graph: max_model_len), so a captured graph
always launches the same grid.

Prefill chunks go to PyTorch's SDPA (flash kernels), or with `kernel_prefill` to `paged_attention`:
one program per (sequence, query head, block of BLOCK_M query rows), masking causally from the
row's position (context length - query length + row) and by the sliding window.

Both read the KV cache in place; nothing is gathered or padded. float32 models compute in
float32 (IEEE dots, not TF32: exact parity), 16-bit models take the tensor cores with float32
accumulation.

Its logic is tested on the CPU under Triton's interpreter (TRITON_INTERPRET=1) against the torch
backend; on a GPU the same source compiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.attention.backend import AttentionMetadata, register_attention_backend
from tokenmill.attention.torch_backend import TorchAttentionBackend

_kernel = None
_attend_tile = None  # set by _get_kernel, with the kernels


def _get_kernel():
    """Compiles (defines) the kernel on first use, so that importing tokenmill needs no triton."""
    global _kernel, _attend_tile
    if _kernel is not None:
        return _kernel
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("attention_backend 'triton' needs the triton package (pip install triton)") from e

    @triton.jit
    def attend_tile(q, k, v, allowed, scale, m_i, l_i, acc, IEEE: tl.constexpr):
        """One tile of keys in both kernels' online softmax (FlashAttention's): the scores of the
        allowed keys, the running max and sum rescaled, the values accumulated. float32 models take
        IEEE float32 dots (not TF32: exact parity), 16-bit models the tensor cores with float32
        accumulation."""
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf: subtract 0 there, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    _attend_tile = attend_tile  # a module global: the kernels find the functions they call there

    # One compiled version whatever these values are: the window, the first sequence, and the block
    # table's width (a step's longest context: specialising on its divisibility by 16, or on 1,
    # would compile variants mid-serving, for scalar loads that gain nothing from it).
    @triton.jit(do_not_specialize=["window", "seq0", "stride_bt"])
    def paged_attention(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
        query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
        scale, window, seq0,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_ot, stride_oh,
        stride_bt,
        num_queries_per_kv: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, IEEE: tl.constexpr,
    ):
        seq = tl.program_id(0) + seq0
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
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            q = q.to(tl.float32)

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
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            allowed = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
            if window > 0:
                allowed = allowed & (kpos[None, :] > pos[:, None] - window)
            m_i, l_i, acc = _attend_tile(q, k, v, allowed, scale, m_i, l_i, acc, IEEE)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit(do_not_specialize=["window", "stride_bt"])
    def paged_decode(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr, ml_ptr,
        query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
        scale, window,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_ot, stride_oh,
        stride_bt,
        GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr, IEEE: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        row = tl.load(query_start_loc_ptr + seq)
        ctx = tl.load(seq_lens_ptr + seq)
        h = tl.arange(0, BLOCK_H)
        h_ok = h < GROUP
        heads = kvh * GROUP + h
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            q = q.to(tl.float32)
        # Keys this query (at position ctx - 1) sees: [ctx - window, ctx); this split's share of them,
        # in whole tiles of BLOCK_N keys.
        lo = ctx * 0
        if window > 0:
            lo = tl.maximum(ctx - window, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        tiles = tl.cdiv(ctx - lo, BLOCK_N)
        per = tl.cdiv(tiles, SPLITS)
        first = lo + split * per * BLOCK_N
        last = tl.minimum(ctx, first + per * BLOCK_N)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        offs = tl.arange(0, BLOCK_N)
        for start in range(first, last, BLOCK_N):
            kpos = start + offs
            k_ok = kpos < ctx
            block = tl.load(block_tables_ptr + seq * stride_bt + kpos // BLOCK_SIZE, mask=k_ok, other=0)
            kv_off = (block[:, None] * stride_kb + (kpos % BLOCK_SIZE)[:, None] * stride_ks + kvh * stride_kh
                      + d[None, :])
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            allowed = k_ok
            if window > 0:
                allowed = allowed & (kpos >= ctx - window)
            m_i, l_i, acc = _attend_tile(q, k, v, allowed[None, :], scale, m_i, l_i, acc, IEEE)
        mask = h_ok[:, None] & d_ok[None, :]
        if SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask)
        else:  # partial results: [seq, head, split, d] and (max, sum) per [seq, head, split]
            num_heads = tl.num_programs(1) * GROUP
            base = (seq * num_heads + heads) * SPLITS + split
            tl.store(part_ptr + base[:, None] * BLOCK_D + d[None, :], acc, mask=mask)
            tl.store(ml_ptr + base * 2, m_i, mask=h_ok)
            tl.store(ml_ptr + base * 2 + 1, l_i, mask=h_ok)


    @triton.jit
    def combine_splits(
        out_ptr, part_ptr, ml_ptr, query_start_loc_ptr,
        stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        row = tl.load(query_start_loc_ptr + seq)
        sp = tl.arange(0, SPLITS)
        base = (seq * tl.num_programs(1) + head) * SPLITS + sp
        m = tl.load(ml_ptr + base * 2)
        l_ = tl.load(ml_ptr + base * 2 + 1)
        m_all = tl.max(m, 0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        w = tl.exp(m - m_all)  # splits that saw no key: m = -inf, weight 0
        d = tl.arange(0, BLOCK_D)
        part = tl.load(part_ptr + base[:, None] * BLOCK_D + d[None, :], mask=(d < HEAD_DIM)[None, :], other=0.0)
        total = tl.sum(w * l_, 0)
        out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)

    _kernel = (paged_attention, paged_decode, combine_splits)
    return _kernel


@dataclass(frozen=True)
class DecodeTiling:
    """How paged_decode walks a context: keys per tile, and warps per program."""

    block_n: int
    num_warps: int

    @classmethod
    def parse(cls, text: str) -> DecodeTiling:
        """From "KEYSxWARPS" (e.g. "64x4"), as the benchmarks' and tools' flags give it."""
        keys, warps = (int(x) for x in text.lower().split("x"))
        return cls(keys, warps)


@dataclass
class KernelLaunch:
    """One kernel launch as the backend makes it: run (`launch`) or compiled ahead of time for a GPU
    with no GPU here (attention/triton_aot.py), with the same arguments."""

    kernel: Any  # a triton.jit function
    grid: tuple[int, ...]
    args: tuple
    constants: dict[str, Any] = field(default_factory=dict)  # the constexpr parameters
    num_warps: int = 4
    options: dict[str, Any] = field(default_factory=dict)  # other compile options (enable_fp_fusion)

    def launch(self) -> None:
        self.kernel[self.grid](*self.args, **self.constants, num_warps=self.num_warps, **self.options)


@register_attention_backend
class TritonAttentionBackend(TorchAttentionBackend):
    """paged_decode for the step's decodes (a decode-only step is one or two launches per layer,
    which a CUDA graph holds); prefill chunks to paged_attention (one more launch) when one of them
    has cached context or a window (see _kernel_for_prefills) or with `kernel_prefill`, else, all
    fresh and causal, to PyTorch's SDPA (its flash kernel on CUDA) as in the `torch` backend."""

    name = "triton"
    BLOCK_M = 16
    kernel_prefill = False
    # Launch shapes. Compiled for sm_90 (H100/H200) by Triton 3.6 and 3.9 none spills registers
    # for head sizes 64 and 128 in 16 or 32 bits (tests/test_triton_compile.py; `python -m
    # tokenmill.attention.triton_aot` prints registers and shared memory). 16-bit models take
    # 64-key tiles; float32's IEEE dots hold more per key, so 32. Speed is unmeasured: `bench
    # attention` on a GPU times other tilings (scripts/gpu/check.sh kernels).
    DECODE_16BIT = DecodeTiling(block_n=64, num_warps=4)
    DECODE_FLOAT32 = DecodeTiling(block_n=32, num_warps=4)
    PREFILL_WARPS = 4
    # Programs a decode launch aims at (splits of the context are added until it gets there): twice
    # the SMs on a GPU; under the interpreter a few, so that tests on a CPU cover the splits.
    target_programs: int | None = None
    MAX_SPLITS = 16

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
        bs = meta.block_size
        if bs & (bs - 1) or bs < 16:  # tl.arange and tl.dot want powers of two, at least 16
            raise ValueError(f"attention_backend 'triton': block_size must be a power of two >= 16, got {bs}")
        k_cache, v_cache, flat_k, flat_v = self._write_cache(k, v, kv_cache, meta, cache_written)
        if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
            raise ValueError("attention_backend 'triton': q and the KV cache must be contiguous in head_dim")
        # Contiguous, not empty_like(q): q is a slice of the fused projection, and with one token
        # empty_like would keep its row stride, a launch argument specialised differently.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.num_seqs == 0:
            return out
        nd = meta.num_decodes
        if nd:
            for launch in self.decode_launches(q, k_cache, v_cache, out, meta, nd, sliding_window):
                launch.launch()
        if meta.num_seqs > nd and self._kernel_for_prefills(meta, nd, sliding_window):
            self.prefill_launch(q, k_cache, v_cache, out, meta, nd, meta.num_seqs - nd, meta.max_query_len,
                                sliding_window).launch()
            return out
        self._prefill_chunks(out, q, k, v, flat_k, flat_v, meta, nd, sliding_window)
        return out

    def _kernel_for_prefills(self, meta: AttentionMetadata, nd: int, window: int | None) -> bool:
        """Whether the step's prefill chunks go to paged_attention: with kernel_prefill, and whenever
        one attends to cached context (a prefix-cache hit, a chunked prompt's later chunks, drafts
        being verified) or a window. SDPA then takes a mask, and on CUDA a mask with GQA runs its
        math kernel: the whole [heads, rows, context] scores in float32 (GiBs for a long context),
        memory the profiling step (fresh chunks) never sees."""
        if self.kernel_prefill or window is not None:
            return True
        masked = meta.scratch.get("prefill_masked")
        if masked is None:  # (the same in every layer)
            qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
            masked = meta.scratch["prefill_masked"] = any(
                lens[i] > qsl[i + 1] - qsl[i] for i in range(nd, meta.num_seqs))
        return masked

    def decode_tiling(self, dtype: torch.dtype) -> DecodeTiling:
        return self.DECODE_FLOAT32 if dtype == torch.float32 else self.DECODE_16BIT

    @staticmethod
    def _ieee(dtype: torch.dtype) -> bool:
        # Under the interpreter, bfloat16 dots are not emulated: they compute in float32 there.
        return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")

    def num_splits(self, meta: AttentionMetadata, seqs: int, block_n: int, device: torch.device) -> int:
        """Splits of each decode's context: enough programs for the device, at most one per tile of
        the longest context, a power of two (the combine kernel's arange)."""
        if self.target_programs is None:
            on_gpu = device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            self.target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 8
        want = -(-self.target_programs // (seqs * self.num_kv_heads))
        cap = min(self.MAX_SPLITS, max(1, -(-meta.max_seq_len // block_n)), want)
        splits = 1
        while splits * 2 <= cap:
            splits *= 2
        return splits

    def decode_launches(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                        meta: AttentionMetadata, seqs: int, window: int | None,
                        splits: int | None = None) -> list[KernelLaunch]:
        """paged_decode over the first `seqs` sequences of the step (one query row each), then with
        more than one split of their contexts combine_splits."""
        import triton

        _, decode, combine = _get_kernel()
        group = self.num_heads // self.num_kv_heads
        tiling = self.decode_tiling(q.dtype)
        block_d = max(16, triton.next_power_of_2(self.head_dim))
        if splits is None:
            splits = self.num_splits(meta, seqs, tiling.block_n, q.device)
        parts = ml = out  # (unused with one split)
        if splits > 1:  # partial sums, once per step (every layer has the same shapes)
            key = ("decode_parts", seqs, self.num_heads, splits, block_d)
            if key not in meta.scratch:
                meta.scratch[key] = (
                    torch.empty(seqs, self.num_heads, splits, block_d, dtype=torch.float32, device=q.device),
                    torch.empty(seqs, self.num_heads, splits, 2, dtype=torch.float32, device=q.device))
            parts, ml = meta.scratch[key]
        launches = [KernelLaunch(
            decode, (seqs, self.num_kv_heads, splits),
            (q, k_cache, v_cache, out, parts, ml,
             meta.query_start_loc, meta.seq_lens, meta.block_tables,
             self.scale, window or 0,
             q.stride(0), q.stride(1),
             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
             out.stride(0), out.stride(1),
             meta.block_tables.stride(0)),
            dict(GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
                 HEAD_DIM=self.head_dim, BLOCK_D=block_d, BLOCK_SIZE=meta.block_size, BLOCK_N=tiling.block_n,
                 SPLITS=splits, IEEE=self._ieee(q.dtype)),
            tiling.num_warps)]
        if splits > 1:
            launches.append(KernelLaunch(
                combine, (seqs, self.num_heads),
                (out, parts, ml, meta.query_start_loc, out.stride(0), out.stride(1)),
                dict(HEAD_DIM=self.head_dim, BLOCK_D=block_d, SPLITS=splits)))
        return launches

    def prefill_launch(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                       meta: AttentionMetadata, seq0: int, seqs: int, max_rows: int,
                       window: int | None) -> KernelLaunch:
        """paged_attention over sequences seq0 .. seq0 + seqs - 1 of the step. Kernels launch on the
        current device: the model runner makes that the model's (ModelRunner.on_device)."""
        import triton

        return KernelLaunch(
            _get_kernel()[0], (seqs, self.num_heads, triton.cdiv(max_rows, self.BLOCK_M)),
            (q, k_cache, v_cache, out,
             meta.query_start_loc, meta.seq_lens, meta.block_tables,
             self.scale, window or 0, seq0,
             q.stride(0), q.stride(1),
             k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
             out.stride(0), out.stride(1),
             meta.block_tables.stride(0)),
            dict(num_queries_per_kv=self.num_heads // self.num_kv_heads,
                 HEAD_DIM=self.head_dim, BLOCK_D=max(16, triton.next_power_of_2(self.head_dim)),
                 BLOCK_M=self.BLOCK_M, BLOCK_SIZE=meta.block_size, IEEE=self._ieee(q.dtype)),
            self.PREFILL_WARPS)
