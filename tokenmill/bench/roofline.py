"""The machine's limits, measured in the run that is compared with them: memory bandwidth (what
decode at small batches is bound by) and matmul FLOPs (what large batches and prefill are bound
by). `bench latency` sets decode's achieved bandwidth beside them, `bench throughput` its MFU.

Both are measured, not looked up: a device's spec sheet figure is often out of reach (an H200's
4.8 TB/s, say), and the achievable figure is the fair limit to compare with. A spec peak can
still be given (`--peak-tflops`) for MFU as it is usually quoted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The best of `repeats` timings of fn. On a GPU each timing covers 10 back-to-back calls between
    two synchronisations, so that the launch and the sync (tens of microseconds, against a copy of
    a few hundred) stay out of it."""
    inner = 10 if device.type == "cuda" else 1
    fn()  # warm-up: allocation, kernel selection, page faults
    sync_device(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync_device(device)
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def _default_bytes(device: torch.device) -> int:
    # Far beyond any cache (an H200's L2 is 60 MB, this CPU's L3 32 MB), small enough for any host.
    return 2**30 if device.type == "cuda" else 512 * 2**20


def copy_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of copying one large tensor into another on the device, counting the bytes read and
    the bytes written (as STREAM's copy does): the usual measure of a device's memory bandwidth."""
    device = torch.device(device)
    nbytes = nbytes or _default_bytes(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, repeats)


def read_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of summing one large float32 tensor: reading only, as decode streams its weights."""
    device = torch.device(device)
    nbytes = nbytes or _default_bytes(device)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / _best_seconds(x.sum, device, repeats)


def matmul_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                 repeats: int = 5) -> float:
    """FLOP/s of one square matmul of side n in dtype: the achievable peak MFU is measured against."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_seconds(lambda: torch.matmul(a, b, out=out), device, repeats)


def limits(device: str | torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The three figures, in GB/s and TFLOP/s."""
    return {"copy_bandwidth_gb_s": copy_bandwidth(device) / 1e9, "read_bandwidth_gb_s": read_bandwidth(device) / 1e9,
            "matmul_tflops": matmul_flops(device, dtype) / 1e12}
