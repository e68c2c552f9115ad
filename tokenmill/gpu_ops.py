"""Fused elementwise kernels for CUDA (Triton): RMSNorm, rotate-half RoPE in place, SiLU * up.

Why: written with PyTorch ops, one RMSNorm is seven kernels (the float32 copy, square, mean,
rsqrt, two products, the cast back) and one RoPE about eight (the cos/sin casts, two products,
the half rotation's slice, negation and concatenation, the sum). A batch-1 decode step of a
Llama-3-8B shape would run ~35 kernels per layer, ~1,100 a token; inside a CUDA graph each
still costs a few microseconds of device time, against the ~3.7 ms the step's weights take to
read on an H200: a sixth of the step's time, at the batch size whose goal is 80% of the
memory-bandwidth limit. Fused, with each residual sum inside the norm after it (add_rms_norm,
DecoderLM._forward_fused_norms) and the KV cache write inside RoPE, a layer is about ten kernels
(4 matmuls, 2 norms, RoPE with the cache write, attention, SiLU * up).

Each kernel rounds where PyTorch's sequence of ops rounds (as Hugging Face computes them, and as
the CPU kernels in csrc/cpu_ops.cpp do): the normalised row to the model's dtype before the
weight's product, cos/sin to the dtype and each RoPE product on its own, the activation before
its product with `up`. Only the order of a row's sum of squares differs. The same functions as
the CPU module (`rms_norm`, `rope_`, `silu_mul`), chosen by `tokenmill.kernels.elementwise_ops`;
tests run them under Triton's interpreter on a CPU (tests/test_gpu_ops.py), and
tokenmill/attention/triton_aot.py compiles them for sm_90 as it does the attention kernels.
"""

from __future__ import annotations

import functools

import torch

from tokenmill.attention.triton_backend import KernelLaunch

ROPE_WRITES_CACHE = True  # rope_ takes a cache to write the keys and values into (model/layers.rope_and_cache)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, C, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        h = (x * inv).to(w.dtype)  # rounded to the dtype, then the weight's product (rounded on store)
        tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(w.dtype), mask=mask)

    @triton.jit
    def add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_d, stride_s, stride_o, C, eps,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)  # the residual sum, rounded as x + d is
        tl.store(sum_ptr + row * stride_s + cols, s, mask=mask)
        sf = s.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / C + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        h = (sf * inv).to(w.dtype)
        tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * h.to(tl.float32)).to(w.dtype), mask=mask)

    @triton.jit
    def rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                    stride_vt, stride_vh, NQ, HALF: tl.constexpr, BLOCK: tl.constexpr, WRITE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        mask = i < HALF
        base = x_ptr + t * stride_t + h * stride_h
        a = tl.load(base + i, mask=mask, other=0.0)
        b = tl.load(base + HALF + i, mask=mask, other=0.0)
        dt = a.dtype
        c1 = tl.load(cos_ptr + t * stride_c + i, mask=mask, other=0.0).to(dt).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_c + HALF + i, mask=mask, other=0.0).to(dt).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_c + i, mask=mask, other=0.0).to(dt).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_c + HALF + i, mask=mask, other=0.0).to(dt).to(tl.float32)
        af, bf = a.to(tl.float32), b.to(tl.float32)
        lo = (af * c1).to(dt).to(tl.float32) + (-bf * s1).to(dt).to(tl.float32)
        hi = (bf * c2).to(dt).to(tl.float32) + (af * s2).to(dt).to(tl.float32)
        tl.store(base + i, lo.to(dt), mask=mask)
        tl.store(base + HALF + i, hi.to(dt), mask=mask)
        if WRITE:
            if h >= NQ:  # a key head: it and its value head go into the cache at the token's slot
                kvh = h - NQ
                slot = tl.load(slot_ptr + t)
                dst = (slot * (tl.num_programs(1) - NQ) + kvh) * (2 * HALF)  # cache [slots, kv_heads, D]
                tl.store(kc_ptr + dst + i, lo.to(dt), mask=mask)
                tl.store(kc_ptr + dst + HALF + i, hi.to(dt), mask=mask)
                vsrc = v_ptr + t * stride_vt + kvh * stride_vh
                tl.store(vc_ptr + dst + i, tl.load(vsrc + i, mask=mask, other=0.0), mask=mask)
                tl.store(vc_ptr + dst + HALF + i, tl.load(vsrc + HALF + i, mask=mask, other=0.0), mask=mask)

    @triton.jit
    def silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, INTER, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < INTER
        g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * stride_g + INTER + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds to the dtype before the product
        tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)

    return triton, rms_norm_kernel, rope_kernel, silu_mul_kernel, add_rms_norm_kernel


def _warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> KernelLaunch:
    triton, kernel, _, _, _ = _kernels()
    block = triton.next_power_of_2(x.shape[1])
    return KernelLaunch(kernel, (x.shape[0],), (x, weight, out, x.stride(0), out.stride(0), x.shape[1], float(eps)),
                        dict(BLOCK=block), _warps(block))


def add_rms_norm_launch(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, total: torch.Tensor,
                        out: torch.Tensor) -> KernelLaunch:
    triton, _, _, _, kernel = _kernels()
    block = triton.next_power_of_2(x.shape[1])
    return KernelLaunch(kernel, (x.shape[0],), (x, delta, weight, total, out, x.stride(0), delta.stride(0),
                                                total.stride(0), out.stride(0), x.shape[1], float(eps)),
                        dict(BLOCK=block), _warps(block))


def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                num_q_heads: int = 0) -> KernelLaunch:
    triton, _, kernel, _, _ = _kernels()
    half = x.shape[2] // 2
    v, k_cache, v_cache, slots = cache if cache is not None else (x, x, x, x)
    # No fused multiply-adds: PyTorch rounds each product before the sum (in float32 the casts
    # to the dtype are no-ops, and the compiler would contract a * c + b * s into one rounding).
    return KernelLaunch(kernel, (x.shape[0], x.shape[1]),
                        (x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), v, k_cache, v_cache, slots,
                         v.stride(0), v.stride(1), num_q_heads),
                        dict(HALF=half, BLOCK=triton.next_power_of_2(half), WRITE=cache is not None), 1,
                        dict(enable_fp_fusion=False))


def silu_mul_launch(gate_up: torch.Tensor, out: torch.Tensor) -> KernelLaunch:
    triton, _, _, kernel, _ = _kernels()
    inter = out.shape[1]
    block = min(1024, triton.next_power_of_2(inter))
    return KernelLaunch(kernel, (gate_up.shape[0], triton.cdiv(inter, block)),
                        (gate_up, out, gate_up.stride(0), out.stride(0), inter), dict(BLOCK=block),
                        4 if block >= 512 else 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalise(x) over the last dimension of x [T, C] (rows of any stride)."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError("rms_norm: x must be [T, C] with contiguous rows and weight [C] of x's dtype")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        rms_norm_launch(x, weight.contiguous(), eps, out).launch()
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass: a layer's residual sum and the next norm."""
    if (x.dim() != 2 or x.shape != delta.shape or x.stride(1) != 1 or delta.stride(1) != 1
            or weight.shape != (x.shape[1],) or x.dtype != delta.dtype or weight.dtype != x.dtype):
        raise ValueError("add_rms_norm: x and delta must be [T, C] of one dtype with contiguous rows, weight [C]")
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        add_rms_norm_launch(x, delta, weight.contiguous(), eps, total, out).launch()
    return total, out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
          num_q_heads: int = 0) -> None:
    """Rotate-half RoPE in place on x [T, heads, D] (any row and head strides, contiguous head
    dimension), from cos/sin [T, D] float32 rows (each token's position).

    With cache = (v [T, kv_heads, D], k_cache, v_cache [blocks, block_size, kv_heads, D], slots [T]),
    x's heads from num_q_heads on are keys: each is written, rotated, into k_cache at its token's
    slot, and v's head beside it into v_cache, in the same kernel (the attention backend's two
    index copies a layer, saved)."""
    t, heads, d = x.shape
    if x.stride(2) != 1 or d % 2 or cos.shape != (t, d) or sin.shape != (t, d) or cos.stride() != sin.stride():
        raise ValueError("rope_: x must be [T, heads, D] with a contiguous head dimension, cos/sin [T, D]")
    if cache is not None:
        v, k_cache, v_cache, slots = cache
        kv = heads - num_q_heads
        if (v.shape != (t, kv, d) or v.stride(2) != 1 or k_cache.shape != v_cache.shape or k_cache.shape[-2:] != (kv, d)
                or not k_cache.is_contiguous() or not v_cache.is_contiguous() or k_cache.dtype != x.dtype
                or v_cache.dtype != x.dtype or v.dtype != x.dtype or slots.shape != (t,)):
            raise ValueError("rope_: cache must be (v [T, kv_heads, D], two contiguous caches [.., kv_heads, D] of "
                             "x's dtype, slots [T])")
    if t and heads:
        rope_launch(x, cos, sin, cache, num_q_heads).launch()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] = [gate | up] (rows of any stride) -> [T, I]."""
    if gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2:
        raise ValueError("silu_mul: gate_up must be [T, 2I] with contiguous rows")
    out = torch.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.shape[0]:
        silu_mul_launch(gate_up, out).launch()
    return out
