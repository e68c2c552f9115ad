"""Host memory for weights and the KV cache in transparent huge pages.

Decode streams every weight once per token and attention streams the KV cache; with 4 KB
pages that is one TLB miss per 4 KB, and under a hypervisor (nested paging) each miss is a
two-level page walk. One contiguous region advised MADV_HUGEPAGE (2 MB pages) reads measurably
faster: the model's 120 float32 matrices, interleaved in one process on the dev machine, 24.8
GB/s as separate PyTorch allocations, 29.5 GB/s packed in huge pages (docs/benchmarks/cpu.md).
Where the kernel gives no huge pages (THP off), the region is still one contiguous mapping.
"""

from __future__ import annotations

import math
import mmap

import torch

_ALIGN = 64  # cache line: every tensor starts on one
_HUGE = 2 << 20


def host_arena(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of nbytes on private anonymous memory advised for huge pages (the
    mapping lives as long as any view of the tensor)."""
    mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP compiled out: plain pages
            pass
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    off = (-buf.data_ptr()) % _HUGE  # start on a 2 MB boundary, so the first page can be huge too
    return buf[off : off + nbytes]


def release_pages(t: torch.Tensor) -> None:
    """Gives a host tensor's whole pages back to the kernel (MADV_DONTNEED) without unmapping them:
    the memory is freed now, and the pages come back zero-filled, one fault at a time, when next
    written. For memory of host_arena (private anonymous): a parked model's KV cache."""
    import ctypes
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr()
    first = -(-start // page) * page
    end = (start + t.numel() * t.element_size()) // page * page
    if end <= first:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(first, end - first, 4) != 0:  # 4: MADV_DONTNEED on Linux
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
    if first > start:  # the partial first page stays mapped: zero it by hand
        t.view(torch.uint8).view(-1)[: first - start].zero_()


def pack_parameters(params: list[torch.nn.Parameter], copy: bool = True) -> None:
    """Moves the parameters' data into one huge-page arena, laid end to end in the given order
    (each 64-byte aligned), one at a time, so each original is freed as soon as it is copied
    (peak memory: the model plus one tensor). copy False: only places them (for parameters not
    filled in yet, which the loader then writes straight into the arena)."""
    sizes = [p.numel() * p.element_size() for p in params]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    arena = host_arena(max(total, 1))
    for p, off, n in zip(params, offsets, sizes):
        view = arena[off : off + n].view(p.dtype).view(p.shape)
        if copy:
            view.copy_(p.data)
        p.data = view


def kv_cache_tensors(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A zeroed KV cache, one tensor of `shape` per layer, and on CPU the one huge-page region
    holding them all (touched now, not mid-request; release_pages gives its pages back and keeps
    the mapping), None elsewhere. Zeroed: padded slots are masked, but 0 * NaN from uninitialised
    memory would still poison outputs."""
    if device.type == "cpu":
        arena = host_arena(num_layers * math.prod(shape) * torch.finfo(dtype).bits // 8)
        arena.zero_()
        return list(arena.view(dtype).view(num_layers, *shape).unbind(0)), arena
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)], None
