"""`tokenmill bench attention`: one layer's decode attention over a paged KV cache, per backend.

A decode step's attention reads every key and value of every sequence once, so its bytes (batch
x context x KV heads x head size x 2 x element size) over its time is the bandwidth it achieves;
set beside the device's read bandwidth (measured in the same run, tokenmill/bench/roofline.py) it
says how close the kernel is to the limit. The `torch` backend (gather + SDPA) is the baseline,
and the `triton` backend runs once per tiling given (keys per tile x warps), so that a GPU session
can pick the fastest (TritonAttentionBackend.DECODE_16BIT). Each result is checked against the
torch backend's output. Block tables are shuffled, as a cache that has served a while is. Times
are one layer's, the step's scratch (made once a step for every layer) left out; on a GPU they are
CUDA-graph replays, as the engine's decode steps run. A case whose KV cache is small (a few
sequences) would be read from the L2 cache on every call but the first (an H200's holds 60 MB), and
time faster than memory allows; its calls therefore rotate over copies of it, together at least
--rotate-mib, so that each call reads its KV from memory, as a layer's attention does in a step.

On a CPU only `torch` runs: Triton needs a GPU, or its interpreter (TRITON_INTERPRET=1), which
runs the kernels far too slowly to time but checks their outputs (the tests do).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random

import torch

from tokenmill.bench import check_at_least, int_list, write_json
from tokenmill.bench.roofline import _best_seconds, read_bandwidth
from tokenmill.bench.workload import SHAPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES), help="the model whose attention heads to use")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="1,16,64,256", help="decodes per step, comma-separated")
    p.add_argument("--context-lens", default="1024,8192", help="tokens of context per sequence, comma-separated")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tilings", default="64x4,32x4,64x8,128x8",
                   help="triton paged_decode tilings to time, KEYSxWARPS (the first is the backend's default)")
    p.add_argument("--max-cache-gib", type=float, default=16.0, help="skip cases whose KV cache is larger")
    p.add_argument("--rotate-mib", type=float, default=256.0,
                   help="copies of a small case's KV cache, together at least this many MiB, that its calls "
                        "take in turn, so that none reads its KV from cache (0: one copy)")
    p.add_argument("--repeats", type=int, default=5, help="timings of each; the best is reported")
    p.add_argument("--json", default=None, help="write the figures to this file")


def _case(heads: int, kv_heads: int, head_dim: int, batch: int, context: int, bs: int, dtype: torch.dtype,
          device: torch.device, seed: int):
    from tokenmill.engine.model_runner import build_batch

    per_seq = -(-context // bs)
    blocks = list(range(batch * per_seq))
    random.Random(seed).shuffle(blocks)
    chunks = [([0], context - 1, blocks[i * per_seq : (i + 1) * per_seq]) for i in range(batch)]
    _, _, meta = build_batch(chunks, bs, device)
    g = torch.Generator(device=device).manual_seed(seed)
    cache = torch.randn((2, len(blocks), bs, kv_heads, head_dim), generator=g, device=device, dtype=dtype)
    q = torch.randn((batch, heads, head_dim), generator=g, device=device, dtype=dtype)
    k = torch.randn((batch, kv_heads, head_dim), generator=g, device=device, dtype=dtype)
    v = torch.randn_like(k)
    return q, k, v, cache, meta


def _seconds(step, device: torch.device, repeats: int, calls: int = 10) -> tuple[float, str]:
    """Seconds per call of step, and how they were timed. On a GPU: `calls` calls captured in a CUDA
    graph and replayed, so that the launches' host time (tens of microseconds, more than a small
    batch's kernel) stays out, as in the engine's graphs; eagerly where capture fails. (step takes
    the next copy of its case at each call: `calls` is a multiple of the copies.)"""
    if device.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    step()
            graph.replay()
            torch.cuda.synchronize(device)
            best = float("inf")
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3 / calls)
            return best, "graph"
        except Exception as e:  # (the torch backend's host-side sizes, say): eagerly
            torch.cuda.synchronize(device)
            return _best_seconds(step, device, repeats), f"eager: {type(e).__name__}"
    return _best_seconds(step, device, repeats), "eager"


def run(args: argparse.Namespace) -> dict:
    from tokenmill.attention import get_attention_backend

    contexts = int_list(args.context_lens, "--context-lens")
    batches = int_list(args.batch_sizes, "--batch-sizes")
    if not contexts or not batches:
        raise ValueError("--context-lens and --batch-sizes: give one or more values each")
    check_at_least("--block-size", args.block_size)
    check_at_least("--repeats", args.repeats)
    if not args.rotate_mib >= 0:
        raise ValueError(f"--rotate-mib must be >= 0, got {args.rotate_mib:g}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    _, shape = SHAPES[args.shape]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // heads
    elem = torch.finfo(dtype).bits // 8
    runs: list[tuple[str, str | None]] = [("torch", None)]
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from tokenmill.attention.triton_backend import DecodeTiling  # (the import registers "triton")

        runs += [("triton", t) for t in args.tilings.split(",") if t]
    bw = read_bandwidth(device)
    print(f"{args.shape}: {heads} heads, {kv_heads} KV heads, head size {head_dim}, {args.dtype}, block size "
          f"{args.block_size}, on {device}; read bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for context in contexts:
        for batch in batches:
            kv_bytes = batch * context * kv_heads * head_dim * 2 * elem
            if kv_bytes > args.max_cache_gib * 2**30:
                print(f"batch {batch}, context {context}: {kv_bytes / 2**30:.1f} GiB of KV > --max-cache-gib, skipped")
                continue
            ncopies = max(1, min(1024, -(-int(args.rotate_mib * 2**20) // kv_bytes)))  # (Qwen2.5-0.5B, batch 1: 512)
            cases = [_case(heads, kv_heads, head_dim, batch, context, args.block_size, dtype, device,
                           seed=batch * 7919 + context + i) for i in range(ncopies)]
            calls = ncopies * -(-10 // ncopies)
            ref = base_us = ref_name = None
            for name, tiling in runs:
                backend = get_attention_backend(name)(heads, kv_heads, head_dim, head_dim**-0.5)
                if tiling:
                    backend.DECODE_16BIT = backend.DECODE_FLOAT32 = DecodeTiling.parse(tiling)
                turn = itertools.cycle(cases)

                def step(backend=backend, turn=turn):
                    q, k, v, cache, meta = next(turn)
                    return backend.forward(q, k, v, cache, meta)

                label = name + (f" {tiling}" if tiling else "")
                try:
                    for c in cases:  # the step's scratch (masks, split buffers): made once, used by every layer
                        c[4].scratch.clear()
                    out = step()  # (the first copy's)
                    if ref is None:  # the torch backend's, the first (another's if it ran out of memory)
                        ref, ref_name = out.float(), label
                    err = (out.float() - ref).abs().max().item()
                    del out
                    for _ in cases[1:]:  # the other copies' scratch, made before timing; back to the first
                        step()
                    with torch.inference_mode():
                        secs, timed = _seconds(step, device, args.repeats, calls)
                except torch.cuda.OutOfMemoryError:  # (the torch backend's math SDPA at a large batch and
                    # context: the case's other backends and the cases after it still run)
                    for c in cases:
                        c[4].scratch.clear()
                    torch.cuda.empty_cache()
                    print(f"context {context:6}  batch {batch:4}  {label:14} out of memory")
                    rows.append(dict(context=context, batch=batch, backend=name, tiling=tiling, error="out of memory"))
                    continue
                row = dict(context=context, batch=batch, backend=name, tiling=tiling, timed=timed,
                           copies=ncopies, microseconds=secs * 1e6, gb_s=kv_bytes / secs / 1e9,
                           fraction_of_read_bw=kv_bytes / secs / bw, max_abs_diff=err, diff_against=ref_name)
                rows.append(row)
                base_us = base_us or row["microseconds"]
                print(f"context {context:6}  batch {batch:4}  {label:14} {secs * 1e6:9.1f} us  "
                      f"{row['gb_s']:8.1f} GB/s  {100 * row['fraction_of_read_bw']:5.1f}% of read bw  "
                      f"x{base_us / row['microseconds']:.2f} vs {ref_name}  "
                      f"max |diff| {err:.1e}  ({timed}{f', {ncopies} copies' if ncopies > 1 else ''})")
            del cases, step, turn, ref  # before the next case's caches are made
            # (written as it goes: a run cut short by the device session's time keeps its rows)
            res = dict(shape=args.shape, dtype=args.dtype, device=str(device), block_size=args.block_size,
                       read_bandwidth_gb_s=bw / 1e9, rows=rows)
            write_json(args.json, res)
    res = dict(shape=args.shape, dtype=args.dtype, device=str(device), block_size=args.block_size,
               read_bandwidth_gb_s=bw / 1e9, rows=rows)
    write_json(args.json, res)
    return res
