"""Min-p/top-k/top-p sampling of the rows whose kept tokens reach past the sampler's candidates,
on a GPU, with no sort and no wait for the device (Triton; sampler.Sampler._sample uses it on CUDA).

The sampler draws most filtered rows among a partial top-k of candidates. A row whose nucleus,
min-p floor or k-th value tie reaches past them needs its whole row: on a CPU those rows are found
and sorted, but finding them on a GPU means asking the device, a wait that under async scheduling
would stall the host until the forward in flight ends. This kernel runs over every row with a
fixed shape instead; a row not marked wide returns at once. The min-p floor is the row's largest
value plus log(min_p); each other threshold (the k-th value, then the nucleus's edge) is searched
over the row's values, K at a time, one pass over the row each (about a dozen passes, from L2),
and the draw inverts the kept mass's CDF in token-id order with a float64 running sum, as
sampler.sample_rows does. Ties at the nucleus's edge are all kept (a sort keeps some of them).
Tests run it under Triton's interpreter on a CPU (tests/test_sampler.py, tests/test_input_batch.py);
attention/triton_aot.py compiles it for sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.attention.triton_backend import KernelLaunch

# Values a pass loads at a time, thresholds a search pass weighs, warps: one row's program spans a
# whole SM's worth of threads, since a batch usually has few wide rows and each is ~14 passes long.
BLOCK, THRESHOLDS, WARPS = 2048, 8, 16


@triton.jit
def _ordered(x):
    # float32 -> an integer in the same order (negative floats' magnitude bits flipped), so that a
    # threshold is searched over the integers and lands on one of the row's values exactly
    b = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))  # (-0.0 ties with +0.0)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _scaled(base, idx, V, temp):
    # logits / temp, rounded as torch divides (Triton's `/` is an approximate division)
    return tl.math.div_rn(tl.load(base + idx, mask=idx < V, other=float("-inf")), temp)


@triton.jit
def _search(base, V, temp, m, lo, hi, target, COUNT: tl.constexpr, BLOCK: tl.constexpr, K: tl.constexpr):
    # The smallest t in (lo, hi] where the weight of the row's values above t falls below target
    # (weight: 1 a value with COUNT, else exp(x - m)); known: weight above lo >= target, above hi
    # < target. Each pass over the row weighs K thresholds spread over the interval.
    offs = tl.arange(0, BLOCK)
    j = tl.arange(1, K + 1).to(tl.int64)
    while hi - lo > 1:
        step = (hi - lo + K) // (K + 1)
        t = tl.minimum(lo + j * step, hi - 1)
        acc = tl.zeros([BLOCK, K], dtype=tl.float32)  # (summed across the block once, after the pass)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = _scaled(base, idx, V, temp)
            w = tl.where(idx < V, 1.0, 0.0) if COUNT else tl.exp(x - m)
            acc += tl.where(_ordered(x)[:, None] > t[None, :], w[:, None], 0.0)
        ge = tl.sum(acc, axis=0) >= target
        lo = tl.max(tl.where(ge, t, lo), axis=0)
        hi = tl.min(tl.where(ge, hi, t), axis=0)
    return hi


@triton.jit
def wide_sample_kernel(logits_ptr, stride, temp_ptr, k_ptr, p_ptr, lmp_ptr, wide_ptr, u_ptr, out_ptr, V,
                       BLOCK: tl.constexpr, K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(wide_ptr + row) != 0:
        base = logits_ptr + row * stride
        temp = tl.load(temp_ptr + row)
        k = tl.load(k_ptr + row)
        p = tl.load(p_ptr + row)
        offs = tl.arange(0, BLOCK)
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        los = tl.full([BLOCK], 2**31 - 1, tl.int64)
        his = tl.full([BLOCK], -(2**31), tl.int64)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = _scaled(base, idx, V, temp)
            mx = tl.maximum(mx, x)
            o = _ordered(x)
            los = tl.minimum(los, tl.where(idx < V, o, 2**31 - 1))
            his = tl.maximum(his, tl.where(idx < V, o, -(2**31)))
        m = tl.max(mx, axis=0)
        lo = tl.min(los, axis=0)
        hi = tl.max(his, axis=0)
        # min-p: keep the values at or above the largest plus log(min_p)
        kept = lo
        count = V
        floor = m + tl.load(lmp_ptr + row)
        if floor > float("-inf"):
            kept = tl.maximum(lo, _ordered(floor))
        if (floor > float("-inf")) & (k < V):  # (what the floor keeps only matters to a top-k)
            cs = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                cs += tl.where((_ordered(_scaled(base, idx, V, temp)) >= kept) & (idx < V), 1, 0)
            count = tl.sum(cs, axis=0)
        # top-k: then the values no fewer than k of those exceed (the k-th and its ties)
        if k < count:
            kept = _search(base, V, temp, m, kept - 1, hi, k.to(tl.float32), True, BLOCK, K)
        # top-p: then the values that less than top_p of the kept mass exceeds
        if p < 1.0:
            zs = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = _scaled(base, idx, V, temp)
                zs += tl.where(_ordered(x) >= kept, tl.exp(x - m), 0.0)
            kept = _search(base, V, temp, m, kept - 1, hi, p * tl.sum(zs, axis=0), False, BLOCK, K)
        # One draw: the first token, in id order, where the kept mass's running sum (float64)
        # passes u times the total
        total = tl.zeros([], dtype=tl.float64)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = _scaled(base, idx, V, temp)
            total += tl.sum(tl.where(_ordered(x) >= kept, tl.exp(x - m), 0.0).to(tl.float64), axis=0)
        goal = tl.load(u_ptr + row) * total
        run = tl.zeros([], dtype=tl.float64)
        token = -1 + tl.zeros([], dtype=tl.int64)
        last = -1 + tl.zeros([], dtype=tl.int64)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = _scaled(base, idx, V, temp)
            keep = (_ordered(x) >= kept) & (idx < V)
            e = tl.where(keep, tl.exp(x - m), 0.0).to(tl.float64)
            cum = run + tl.cumsum(e, axis=0)
            first = tl.min(tl.where(keep & (cum > goal), idx, V), axis=0).to(tl.int64)
            token = tl.where((token < 0) & (first < V), first, token)
            last = tl.maximum(last, tl.max(tl.where(e > 0, idx, -1), axis=0).to(tl.int64))
            run += tl.sum(e, axis=0)
        # (rounding can leave u * total past the running sum's end: the last kept token of any weight)
        tl.store(out_ptr + row, tl.where(token >= 0, token, last))


def wide_sample_launch(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       log_min_p: torch.Tensor, wide: torch.Tensor, u: torch.Tensor, tokens: torch.Tensor
                       ) -> KernelLaunch:
    return KernelLaunch(wide_sample_kernel, (logits.shape[0],),
                        (logits, logits.stride(0), temp, top_k, top_p, log_min_p, wide.view(torch.uint8), u, tokens,
                         logits.shape[1]), dict(BLOCK=BLOCK, K=THRESHOLDS), WARPS)


def example_launch(vocab: int, rows: int = 1, device: torch.device | str = "cpu") -> KernelLaunch:
    """A launch on zeros with no row marked wide: compiling it is all it does (the engine's warm-up,
    attention/triton_aot.py's report)."""
    one = torch.ones(rows, device=device)
    return wide_sample_launch(torch.zeros(rows, vocab, device=device), one, torch.full((rows,), vocab, device=device),
                              one, one * float("-inf"), torch.zeros(rows, dtype=torch.bool, device=device),
                              torch.zeros(rows, dtype=torch.float64, device=device),
                              torch.zeros(rows, dtype=torch.long, device=device))


def wide_sample_(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 log_min_p: torch.Tensor, wide: torch.Tensor, u: torch.Tensor, tokens: torch.Tensor) -> None:
    """For each row with wide[i], tokens[i] = a draw at u[i] from softmax(logits[i] / temp[i])
    restricted to the values at or above its largest plus log_min_p (-inf: none), then to its
    top_k of those (ties with the k-th kept; top_k >= V: none), then to its top_p nucleus (the
    values less than top_p of the kept mass exceeds; 1: none). Other rows are left as they are."""
    b, v = logits.shape
    if logits.stride(1) != 1 or logits.dtype != torch.float32 or tokens.dtype != torch.int64 or not (
            temp.shape == top_k.shape == top_p.shape == log_min_p.shape == wide.shape == tokens.shape == (b,)
            and u.numel() == b and tokens.is_contiguous()):
        raise ValueError("wide_sample_: logits [B, V] float32 with contiguous rows; temp, top_k, top_p, log_min_p, "
                         "wide [B]; u [B] or [B, 1]; tokens [B] int64, contiguous")
    if b:
        wide_sample_launch(logits, temp.float().contiguous(), top_k.long().contiguous(), top_p.float().contiguous(),
                           log_min_p.float().contiguous(), wide.contiguous(), u.double().contiguous(),
                           tokens).launch()
