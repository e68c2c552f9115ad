"""Linear layers and embeddings with a fast path for decode-sized batches and int8 weights.

The modules keep nn.Linear / nn.Embedding's parameter names, so checkpoints load unchanged.
On CPU, a matmul with few rows (a decode step) goes to tokenmill's kernel, which streams
each weight once at close to the memory bandwidth; larger ones (batched decode, prefill) are
compute-bound and go to oneDNN.

`prepack_model` gives each float32 and bfloat16 weight a second copy in oneDNN's blocked
layout for those larger matmuls: float32 GEMMs run 1.4-2.5x faster than PyTorch's on the plain
layout at 32 rows and 1.3-1.6x at prefill sizes; offline serving gains 40% in float32 and 20% in
bfloat16 (docs/benchmarks/cpu.md). The plain weight stays for the kernel, which streams it
faster at batch 1 than a blocked GEMM does; the price is the weights' memory a second time.
Without a copy (int8 weights, prepacking off) PyTorch's GEMM takes the plain weight.

`quantize_int8` turns a loaded float model into int8 weights with one float32 scale per
output channel (symmetric, round to nearest): projections, the LM head and the token
embeddings (whose rows are the tied LM head's channels). Norms stay in the model dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import ops_for

QUANTIZATION_METHODS = ("int8",)

# Largest number of rows for which the kernel beats PyTorch's matmul (docs/benchmarks/cpu.md).
KERNEL_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 8, torch.int8: 16}


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (* scale per output channel) (+ bias), for 2-D x; `packed` is weight prepacked
    for oneDNN (`prepack_weight`), used above the kernel's row limit."""
    if x.shape[0] <= KERNEL_MAX_ROWS.get(weight.dtype, 0):
        ops = ops_for(x)
        if ops is not None:
            return ops.linear(x, weight, scale, bias)
    elif packed is not None and packed.dtype == x.dtype and not _float32_gemm(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    if scale is not None:
        if x.device.type == "cpu":
            # As the kernel computes small batches: the exact int8 * scale weights in float32, rounded
            # once at the end (rounding every weight to bfloat16 would make outputs depend on how
            # many rows share the step).
            b = bias.float() if bias is not None else None
            return F.linear(x.float(), dequantize(weight, scale, torch.float32), b).to(x.dtype)
        weight = dequantize(weight, scale, x.dtype)
    elif _float32_gemm(x, weight):
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


# A bfloat16 matmul on a CPU without native bfloat16 runs in float32 (native_bf16) from this many rows,
# or at any row count for a weight this small: converting a weight that fits in the caches costs
# little, a large one (an LM head: 49152x576, 34 ms) costs more than the emulated GEMM saves until
# about 48 rows (measured against oneDNN's prepacked bfloat16 GEMM: 17.6 ms at 16 rows, 36 converted;
# 63 ms at 64, 48 converted; a 1536x576 projection: 0.51 ms at 16 rows, 0.32 converted).
FLOAT32_GEMM_ROWS = 48
FLOAT32_GEMM_MAX_WEIGHT = 8 * 2**20  # elements


def _float32_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16()
            and (x.shape[0] >= FLOAT32_GEMM_ROWS or weight.numel() <= FLOAT32_GEMM_MAX_WEIGHT))


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Without, PyTorch's and
    oneDNN's bfloat16 GEMMs are emulated and 3-5x slower than float32's (a 512x576 by 576x1536
    matmul: 15.4 ms against 3.2 with the operands converted, on an Intel Xeon without AVX512-BF16),
    so matmuls above the kernel's rows run in float32 there (_float32_gemm), the weight converted
    on the way."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # (a torch without the probes: trust oneDNN)
        return True


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale[:, None]).to(dtype)


# oneDNN picks the blocked layout for a batch size; the layout for 32 rows was as fast as any
# other from 9 to 2,048 rows in the measurements, and the 32-stream decode step is what it serves.
_PREPACK_ROWS = 32
_PREPACK_DTYPES = (torch.float32, torch.bfloat16)


def can_prepack(weight: torch.Tensor) -> bool:
    if not (weight.device.type == "cpu" and weight.dtype in _PREPACK_DTYPES and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    # oneDNN's bfloat16 GEMM needs AVX-512 (BW/VL/DQ) or AMX (emulated without AVX512-BF16, where it
    # still beats converting a large weight at a few rows: _float32_gemm); elsewhere PyTorch's own.
    return weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A copy of an [out, in] weight in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PREPACK_ROWS)


def prepack_targets(model: nn.Module) -> list[Linear | Embedding]:
    """The modules whose weights a GEMM reads: every Linear and, when it is the tied LM head, the
    token embedding; only unquantized float32 and bfloat16 weights have a prepacked path."""
    lm_head = getattr(model, "lm_head", "absent")
    mods: list[Linear | Embedding] = [m for m in model.modules() if isinstance(m, Linear)]
    if lm_head is None and isinstance(getattr(model, "embed_tokens", None), Embedding):
        mods.append(model.embed_tokens)
    return [m for m in mods if m.scale is None and can_prepack(m.weight)]


def prepack_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in prepack_targets(model))


def prepack_model(model: nn.Module) -> int:
    """Prepacks every eligible weight (see the module docstring); returns how many."""
    mods = prepack_targets(model)
    for m in mods:
        m.packed = prepack_weight(m.weight)
    return len(mods)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 weight, float32 scale) with weight ~= q * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.scale: nn.Parameter | None = None  # per-output-channel scale once quantized
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout (prepack_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale, self.bias, self.packed)

    def quantize_int8(self) -> None:
        self.packed = None
        q, scale = quantize_rows_int8(self.weight.data)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def declare_int8(self) -> None:
        self.packed = None
        self.weight, self.scale = _int8_params(self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        self.scale: nn.Parameter | None = None
        self.out_dtype: torch.dtype | None = None  # the activation dtype once the weight is int8
        self.packed: torch.Tensor | None = None  # as Linear's, when this is the tied LM head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return F.embedding(ids, self.weight)
        return (self.weight[ids].float() * self.scale[ids, None]).to(self.out_dtype)

    def quantize_int8(self) -> None:
        self.packed = None
        self.out_dtype = self.weight.dtype
        q, scale = quantize_rows_int8(self.weight.data)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def declare_int8(self) -> None:
        self.packed = None
        self.out_dtype = self.weight.dtype
        self.weight, self.scale = _int8_params(self.weight)


def _int8_params(weight: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """An int8 weight of weight's shape and its per-row float32 scales, unfilled, where weight is."""
    return (nn.Parameter(torch.empty(weight.shape, dtype=torch.int8, device=weight.device), requires_grad=False),
            nn.Parameter(torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device), requires_grad=False))


def quantize_model(model: nn.Module, method: str, empty: bool = False) -> None:
    """Quantizes the model's Linear and Embedding weights; empty: declares their int8 weights and
    scales unfilled instead (a model on the meta device, which the loader fills one checkpoint
    tensor at a time: a float copy of the whole model never exists)."""
    if method != "int8":
        raise ValueError(f"quantization: unknown method {method!r}; available: {', '.join(QUANTIZATION_METHODS)}")
    for module in model.modules():
        if isinstance(module, (Linear, Embedding)):
            module.declare_int8() if empty else module.quantize_int8()
