"""Host memory for weights and the KV cache in transparent huge pages.

Decode streams every weight once per token and attention streams the KV cache; with 4 KB
pages that is one TLB miss per 4 KB, and under a hypervisor (nested paging) each miss is a
two-level page walk. One contiguous region advised MADV_HUGEPAGE (2 MB pages) reads measurably
faster: the model's 120 float32 matrices, interleaved in one process on the dev machine, 24.8
GB/s as separate PyTorch allocations, 29.5 GB/s packed in huge pages (docs/benchmarks/cpu.md).
Where the kernel gives no huge pages (THP off), the region is still one contiguous mapping.
"""

from __future__ import annotations

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


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], list[int], int]:
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    return sizes, offsets, max(total, 1)


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the tensors laid end to end (in the given order, each 64-byte aligned) in one
    huge-page arena."""
    sizes, offsets, total = _layout(tensors)
    arena = host_arena(total)
    out = []
    for t, off, n in zip(tensors, offsets, sizes):
        view = arena[off : off + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


def pack_parameters(params: list[torch.nn.Parameter]) -> None:
    """Moves the parameters' data into one arena laid out as `pack` does, one at a time, so each
    original is freed as soon as it is copied (peak memory: the model plus one tensor)."""
    sizes, offsets, total = _layout([p.data for p in params])
    arena = host_arena(total)
    for p, off, n in zip(params, offsets, sizes):
        view = arena[off : off + n].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
