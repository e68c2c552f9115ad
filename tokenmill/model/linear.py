"""Linear layers and embeddings with a fast path for decode-sized batches and int8 weights.

The modules keep nn.Linear / nn.Embedding's parameter names, so checkpoints load unchanged.
On CPU, a matmul with few rows (a decode step) goes to tokenmill's kernel, which streams
each weight once at close to the memory bandwidth; larger ones (prefill) use PyTorch's
GEMM, which is compute-bound there and does well.

`quantize_int8` turns a loaded float model into int8 weights with one float32 scale per
output channel (symmetric, round to nearest): projections, the LM head and the token
embeddings (whose rows are the tied LM head's channels). Norms stay in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import ops_for

QUANTIZATION_METHODS = ("int8",)

# Largest number of rows for which the kernel beats PyTorch's matmul (docs/benchmarks/cpu.md).
KERNEL_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 8, torch.int8: 16}


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (* scale per output channel) (+ bias), for 2-D x."""
    if x.shape[0] <= KERNEL_MAX_ROWS.get(weight.dtype, 0):
        ops = ops_for(x)
        if ops is not None:
            return ops.linear(x, weight, scale, bias)
    if scale is not None:
        weight = dequantize(weight, scale, x.dtype)
    return F.linear(x, weight, bias)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale[:, None]).to(dtype)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale, self.bias)

    def quantize_int8(self) -> None:
        q, scale = quantize_rows_int8(self.weight.data)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        self.scale: nn.Parameter | None = None
        self.out_dtype: torch.dtype | None = None  # the activation dtype once the weight is int8

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return F.embedding(ids, self.weight)
        return (self.weight[ids].float() * self.scale[ids, None]).to(self.out_dtype)

    def quantize_int8(self) -> None:
        self.out_dtype = self.weight.dtype
        q, scale = quantize_rows_int8(self.weight.data)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)


def quantize_model(model: nn.Module, method: str) -> None:
    if method != "int8":
        raise ValueError(f"quantization: unknown method {method!r}; available: {', '.join(QUANTIZATION_METHODS)}")
    for module in model.modules():
        if isinstance(module, (Linear, Embedding)):
            module.quantize_int8()
