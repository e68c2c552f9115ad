"""tokenmill's CPU kernels (tokenmill/csrc/cpu_ops.cpp), compiled for this machine on first use.

Why a compiled extension: PyTorch's batch-1 matmul paths reach 8-17 GB/s of the ~28 GB/s this
kind of machine can read, and its decode attention needs a gather into a padded copy; see
docs/benchmarks/cpu.md. The source is compiled with `-march=native -fopenmp` by PyTorch's
cpp_extension (PyTorch's own flags and OpenMP thread pool) into PyTorch's
extension cache, once per source version: `make install` does it ahead of time
(`tokenmill build-kernels`). Where it cannot be built (no compiler, no AVX-512, or
TOKENMILL_NO_KERNELS=1) every caller falls back to PyTorch's own ops, with one warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from types import ModuleType

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cpu_ops.cpp")
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


def _build(verbose: bool = False) -> ModuleType:
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is a header template that only forks threads when the caller is
    # compiled with OpenMP; without it every kernel ran on one core. The extension links
    # libgomp.so.1, which resolves to the copy PyTorch already loaded (one thread pool).
    cflags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(cflags).encode()).hexdigest()[:12]
    # The name carries the source and flags' hash, so an edited kernel never loads a stale build.
    return load(name=f"tokenmill_cpu_ops_{digest}", sources=[_SOURCE], verbose=verbose,
                extra_cflags=cflags, extra_ldflags=["-fopenmp"])


def cpu_ops() -> ModuleType | None:
    """The compiled module, or None when it is unavailable here (callers then use PyTorch ops)."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("TOKENMILL_NO_KERNELS", "") not in ("", "0"):
            logger.info("TOKENMILL_NO_KERNELS is set: using PyTorch ops only")
        else:
            try:
                mod = _build()
                if mod.available():
                    _module = mod
                else:
                    logger.warning("tokenmill CPU kernels need AVX-512; using PyTorch ops (slower decode)")
            except Exception as e:  # no compiler, no ninja, a failed build: fall back, say why once
                logger.warning("tokenmill CPU kernels could not be built (%s); using PyTorch ops (slower decode)",
                               str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        _tried = True
        return _module


def ops_for(x) -> ModuleType | None:
    """The kernels when they can take tensor x (on CPU, float32 or bfloat16), else None."""
    import torch

    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return cpu_ops()


def elementwise_ops(x) -> ModuleType | None:
    """The fused RMSNorm / RoPE / SiLU * up kernels that can take tensor x: the CPU module's
    (ops_for), on CUDA the Triton ones (tokenmill/gpu_ops.py), else None (PyTorch ops).
    TOKENMILL_NO_KERNELS=1 turns both off."""
    import torch

    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if x.device.type == "cuda":
        mod = _gpu_ops()
        return mod if mod is not None and _gpu_ops_work(mod, x) else None
    return ops_for(x)


_gpu_checked: dict = {}


def _gpu_ops_work(mod: ModuleType, x) -> bool:
    """Whether the Triton kernels compile and run for x's device and dtype, tried once each on a
    small row (a missing C compiler for Triton's launcher, a dtype the GPU lacks): where they do
    not, the model runs PyTorch's ops rather than failing to start."""
    import torch

    key = (x.device, x.dtype)
    ok = _gpu_checked.get(key)
    if ok is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():  # (not a first use: profiling runs eagerly)
            return False
        try:
            row = torch.ones(1, 16, dtype=x.dtype, device=x.device)
            mod.rms_norm(row, row[0], 1e-6)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            ok = True
        except Exception as e:
            logger.warning("the Triton RMSNorm/RoPE/SiLU kernels fail on %s %s (%s); using PyTorch ops", x.device,
                           x.dtype, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            ok = False
        _gpu_checked[key] = ok
    return ok


_gpu_module: ModuleType | None = None
_gpu_tried = False


def _gpu_ops() -> ModuleType | None:
    global _gpu_module, _gpu_tried
    if not _gpu_tried:
        with _lock:
            if not _gpu_tried:
                if os.environ.get("TOKENMILL_NO_KERNELS", "") in ("", "0"):
                    try:
                        import triton  # noqa: F401

                        from tokenmill import gpu_ops

                        _gpu_module = gpu_ops
                    except ImportError:
                        logger.warning("triton is not installed: RMSNorm, RoPE and SiLU run as PyTorch ops on the GPU")
                _gpu_tried = True
    return _gpu_module


def build(verbose: bool = False) -> int:
    """Builds the kernels now (`tokenmill build-kernels`); returns a process exit code."""
    try:
        mod = _build(verbose=verbose)
    except Exception as e:
        print(f"tokenmill CPU kernels: build failed: {e}", file=sys.stderr)
        return 1
    print(f"tokenmill CPU kernels: built ({'AVX-512' if mod.available() else 'no AVX-512 here: not used'})")
    return 0
