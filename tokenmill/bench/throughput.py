"""Offline throughput: tokenmill against transformers' generate on the same random model and workload.

Both run the same requests (random prompts, per-request output lengths, ignore_eos). The
transformers side does what a competent user does, and then some: it sorts the requests by their
output lengths (which a real user cannot know: the baseline is favoured), then prompt lengths,
so that each batch runs few wasted steps and pads little, batches with left padding and
generates up to the longest request in each batch; only the tokens each request asked for are
counted. It warms up first and every batch size runs the same requests (--hf-max-requests: a
subset spread over the workload, which tokenmill then runs too, for the ratio on equal work).

Beside the throughput: tokenmill's MFU (the model FLOPs of its steps, as the energy accounting
counts them, per second, over the device's measured matmul peak in the run's dtype, and over
--peak-tflops when given), and the bandwidth its steps achieve (the weights read once a step)
over the measured copy bandwidth (tokenmill/bench/roofline.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import tempfile
import time

import torch
from tqdm import tqdm

from tokenmill.bench import check_at_least, int_list, torch_dtype, write_json
from tokenmill.bench.datasets import Request, token_id_requests
from tokenmill.bench.latency import weight_bytes_per_step
from tokenmill.bench.roofline import copy_bandwidth, matmul_flops, sync_device
from tokenmill.bench.workload import SHAPES, make_random_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder; if it has no config.json, a random model of --shape is written "
                   "there (default: a temp dir; with --load-format dummy only its config.json)")
    p.add_argument("--shape", default="smollm-135m", choices=sorted(SHAPES),
                   help="the random model's shape when --model has none")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone, for both systems (a large shape with no "
                        "checkpoint at hand; throughput does not depend on the weights' values)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--hf-batch-sizes", default="1,8,64",
                   help="transformers batch sizes to try; the best is the baseline ('' to skip transformers)")
    p.add_argument("--hf-max-requests", type=int, default=0,
                   help="run transformers on at most max(this, the largest batch size) requests, the same for "
                        "every size (0 = all); tokenmill then runs that subset too, and the ratio is on it")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens for the batch-1 decode comparison")
    p.add_argument("--prefix-caching-ab", type=int, default=0, metavar="ROUNDS",
                   help="also run the tokenmill workload with prefix caching on and off, ROUNDS times each in "
                        "on/off/off/on order (cache emptied before each run), and report the ratio")
    p.add_argument("--async-ab", type=int, default=0, metavar="ROUNDS",
                   help="also run the workload with async scheduling on and off, interleaved, ROUNDS times each")
    p.add_argument("--ab-top-p", type=float, default=None, metavar="P",
                   help="--async-ab also samples with temperature 1 and this top_p, both modes (on random weights "
                        "nearly every row's nucleus reaches past the sampler's candidates: its costliest path)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's spec peak in the run's dtype (dense), for MFU as usually quoted; MFU is "
                        "always also given against the matmul peak measured here")
    p.add_argument("--json", help="write the figures to this file")


def check_args(args: argparse.Namespace) -> list[int]:
    """Fails on bad settings before anything loads; returns the transformers batch sizes."""
    check_at_least("--num-prompts", args.num_prompts)
    for flag, (lo, hi) in (("--input-len", args.input_len), ("--output-len", args.output_len)):
        check_at_least(f"{flag} MIN", lo)
        if hi < lo:
            raise ValueError(f"{flag}: MAX ({hi}) is below MIN ({lo})")
    check_at_least("--decode-tokens", args.decode_tokens, 2)  # (a decode step needs a token after the first)
    check_at_least("--max-num-seqs", args.max_num_seqs)
    check_at_least("--max-num-batched-tokens", args.max_num_batched_tokens)
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be > 0, got {args.peak_tflops:g}")
    torch_dtype(args.dtype)
    return int_list(args.hf_batch_sizes, "--hf-batch-sizes")


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM, SamplingParams

    sizes = check_args(args)
    # A folder without config.json gets a random SmolLM-135M-shaped model written into it.
    model_dir = make_random_model(args.model or tempfile.mkdtemp(prefix="tokenmill-bench-"), shape_name=args.shape,
                                  weights=args.load_format != "dummy")
    # The device's limits first, before the engine takes its memory.
    copy_bw = copy_bandwidth(args.device)
    peak = matmul_flops(args.device, getattr(torch, args.dtype))
    if args.device != "cpu":
        torch.cuda.empty_cache()
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, load_format=args.load_format,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    vocab = llm.engine.model_config.vocab_size
    reqs = token_id_requests(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, args.seed)
    weight_bytes = weight_bytes_per_step(llm)  # (what a step reads: not an untied embedding table)
    results: dict = {"args": {k: v for k, v in vars(args).items() if not callable(v)},
                     "model": model_dir, "num_prompts": len(reqs), "weight_bytes": weight_bytes,
                     "async_scheduling": llm.engine.async_scheduling,
                     "copy_bandwidth_gb_s": copy_bw / 1e9, "matmul_tflops": peak / 1e12}
    print(f"{args.device}: copy bandwidth {copy_bw / 1e9:.1f} GB/s, {args.dtype} matmul {peak / 1e12:.2f} TFLOP/s "
          "(measured)", flush=True)

    # Warm up once (allocator, kernels), then measure.
    llm.generate({"prompt_token_ids": reqs[0].prompt[:16]}, SamplingParams(max_tokens=2))
    llm.engine.reset_prefix_cache()  # the measured run computes every prompt token
    tm = _run_tokenmill(llm, reqs)
    tm["bandwidth_gb_s"] = weight_bytes * tm["steps_per_s"] / 1e9
    tm["of_copy_bandwidth"] = tm["bandwidth_gb_s"] * 1e9 / copy_bw
    tm["mfu"] = tm["flops_per_s"] / peak
    if args.peak_tflops:
        tm["mfu_of_spec_peak"] = tm["flops_per_s"] / (args.peak_tflops * 1e12)
    results["tokenmill"] = tm
    _print("tokenmill", tm, weight_bytes)
    print(f"tokenmill: {tm['flops_per_s'] / 1e12:.3f} TFLOP/s of model FLOPs, MFU {tm['mfu']:.1%} of the measured "
          f"matmul peak" + (f", {tm['mfu_of_spec_peak']:.1%} of {args.peak_tflops:g} TFLOP/s" if args.peak_tflops
                            else "") + f"; weights read at {tm['of_copy_bandwidth']:.0%} of copy bandwidth", flush=True)

    if args.prefix_caching_ab > 0:
        results["prefix_caching_ab"] = _prefix_caching_ab(llm, reqs, args.prefix_caching_ab)
    if args.async_ab > 0:
        results["async_ab"] = _async_ab(llm, reqs, args.async_ab)
        if args.ab_top_p is not None:
            results["async_ab_top_p"] = _async_ab(llm, reqs, args.async_ab, dict(temperature=1.0, top_p=args.ab_top_p))

    tm_decode = _tokenmill_decode(llm, reqs[0], args.decode_tokens)
    results["tokenmill_batch1_decode_tok_s"] = tm_decode
    print(f"tokenmill batch-1 decode: {tm_decode:.1f} tok/s "
          f"(bandwidth achieved {weight_bytes * tm_decode / 1e9:.2f} GB/s)")
    hf_reqs = reqs if args.hf_max_requests <= 0 else _spread(reqs, max(args.hf_max_requests, *sizes, 1))
    tm_equal = tm
    if sizes and len(hf_reqs) < len(reqs):  # the ratio on the requests transformers runs
        llm.engine.reset_prefix_cache()
        tm_equal = results["tokenmill_on_transformers_requests"] = _run_tokenmill(llm, hf_reqs)
        _print(f"tokenmill on transformers' {len(hf_reqs)} requests", tm_equal, weight_bytes)
    write_json(args.json, results)  # (as it goes: a device session may end mid-run)
    if sizes:
        del llm  # its weights and KV cache (90% of a GPU) go before transformers loads
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()
        hf = _load_hf(model_dir, args)
        _hf_generate(hf, [hf_reqs[0].prompt[:16]] * 2, 4, args.device)  # warm-up (kernels, allocator)
        best = None
        results["transformers_requests"] = len(hf_reqs)
        for b in sizes:
            try:
                r = _run_hf(hf, hf_reqs, b, args.device)
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                print(f"transformers bs={b}: out of memory", flush=True)
                results[f"transformers_bs{b}"] = {"error": "out of memory"}
                continue
            results[f"transformers_bs{b}"] = r
            _print(f"transformers bs={b} ({len(hf_reqs)} requests)", r, weight_bytes)
            if best is None or r["output_tok_s"] > best["output_tok_s"]:
                best = {**r, "batch_size": b}
            write_json(args.json, results)
        if best is None:
            raise RuntimeError("transformers ran at none of --hf-batch-sizes")
        if best["batch_size"] == max(sizes) and len(hf_reqs) > best["batch_size"]:
            print(f"note: transformers was fastest at its largest batch size tried ({best['batch_size']}): "
                  "a larger one may be faster still", flush=True)
        results["transformers_best"] = best
        hf_decode = _hf_decode(hf, reqs[0], args.decode_tokens, args.device)
        results["transformers_batch1_decode_tok_s"] = hf_decode
        print(f"transformers batch-1 decode: {hf_decode:.1f} tok/s")
        ratio = tm_equal["output_tok_s"] / best["output_tok_s"]
        results["ratio"] = ratio
        results["batch1_decode_ratio"] = tm_decode / hf_decode
        print(f"\nthroughput on the same {len(hf_reqs)} requests: tokenmill {tm_equal['output_tok_s']:.1f} tok/s vs "
              f"transformers (best, bs={best['batch_size']}) {best['output_tok_s']:.1f} tok/s -> ratio {ratio:.2f}x")
        print(f"batch-1 decode: tokenmill {tm_decode:.1f} vs transformers {hf_decode:.1f} tok/s "
              f"-> ratio {tm_decode / hf_decode:.2f}x")
    write_json(args.json, results)
    return results


def _spread(reqs: list[Request], k: int) -> list[Request]:
    """k requests spread evenly over the list (keeps the length distribution of a subset honest)."""
    if k >= len(reqs):
        return reqs
    step = len(reqs) / k
    return [reqs[int(i * step)] for i in range(k)]


def _print(name: str, r: dict, weight_bytes: int) -> None:
    line = (f"{name}: {r['output_tokens']} output tokens in {r['seconds']:.1f}s = {r['output_tok_s']:.1f} tok/s, "
            f"{r['total_tok_s']:.1f} total tok/s")
    if "steps_per_s" in r:
        line += f", {r['steps_per_s']:.2f} steps/s, bandwidth achieved {weight_bytes * r['steps_per_s'] / 1e9:.2f} GB/s"
    if r.get("device_wait_s") is not None:  # async scheduling on a GPU: who waits for whom
        line += (f", the host waited for the device {r['device_wait_s']:.2f}s "
                 f"({r['device_wait_s'] / r['seconds']:.0%} of the run; near 0%: the host's work per step "
                 f"is the bottleneck)")
    print(line, flush=True)


def _run_tokenmill(llm, reqs: list[Request], sampling: dict | None = None) -> dict:
    """The workload through the engine's steps; sampling: SamplingParams fields (default greedy)."""
    from tokenmill import SamplingParams

    engine = llm.engine
    kw = sampling or dict(temperature=0)
    ids = [engine.add_request({"prompt_token_ids": r.prompt},
                              SamplingParams(max_tokens=r.output_len, ignore_eos=True, **kw)) for r in reqs]
    flops0 = engine.energy.flops
    t0, c0 = time.perf_counter(), time.process_time()
    steps = 0
    waited = 0.0  # (async scheduling) the host's waits for the device: near 0, the host is the bottleneck
    done = {}
    with tqdm(total=len(reqs), desc="tokenmill", unit="req", leave=False) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
            steps += 1
            waited += engine.waited_seconds
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out_tokens = sum(len(done[i].outputs[0].token_ids) for i in ids)
    in_tokens = sum(len(r.prompt) for r in reqs)
    return {"seconds": dt, "cpu_seconds": cpu, "output_tokens": out_tokens, "output_tok_s": out_tokens / dt,
            "total_tok_s": (out_tokens + in_tokens) / dt, "steps": steps, "steps_per_s": steps / dt,
            "preemptions": engine.scheduler.num_preemptions, "flops": engine.energy.flops - flops0,
            "flops_per_s": (engine.energy.flops - flops0) / dt,
            "device_wait_s": waited if engine.async_scheduling and engine.device.type == "cuda" else None}


def _prefix_caching_ab(llm, reqs: list[Request], rounds: int) -> dict:
    """Prefix caching's cost when nothing is shared: the same engine and workload with caching on
    and off, interleaved (on, off, off, on, ...) after a warm-up run, so that drift in machine
    load hits both alike."""
    bm = llm.engine.block_manager
    saved = bm.enable_prefix_caching
    runs: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}  # CPU seconds: less sensitive to other tenants
    try:
        # A discarded warm-up first: the run after the main one was slower in two of three
        # measurements here (cause unknown), which would count against whichever mode went first.
        bm.reset_prefix_cache()
        warm = _run_tokenmill(llm, reqs)
        print(f"warm-up: {warm['output_tok_s']:.1f} tok/s (not counted)", flush=True)
        for i in range(2 * rounds):
            mode = "on" if i % 4 in (0, 3) else "off"
            bm.enable_prefix_caching = mode == "on"
            bm.reset_prefix_cache()
            r = _run_tokenmill(llm, reqs)
            runs[mode].append(r["output_tok_s"])
            cpu[mode].append(r["cpu_seconds"])
            print(f"prefix caching {mode}: {r['output_tok_s']:.1f} tok/s, {r['cpu_seconds']:.1f} CPU s", flush=True)
    finally:
        bm.enable_prefix_caching = saved
        bm.reset_prefix_cache()
    on, off = sum(runs["on"]) / len(runs["on"]), sum(runs["off"]) / len(runs["off"])
    cpu_on, cpu_off = sum(cpu["on"]) / len(cpu["on"]), sum(cpu["off"]) / len(cpu["off"])
    print(f"prefix caching with nothing shared: on {on:.1f} vs off {off:.1f} tok/s -> {on / off:.3f}x; "
          f"CPU seconds on {cpu_on:.1f} vs off {cpu_off:.1f} -> {cpu_off / cpu_on:.3f}x")
    return {"warmup_tok_s": warm["output_tok_s"], "warmup_cpu_s": warm["cpu_seconds"],
            "on_tok_s": runs["on"], "off_tok_s": runs["off"], "on_mean": on, "off_mean": off, "ratio": on / off,
            "on_cpu_s": cpu["on"], "off_cpu_s": cpu["off"], "cpu_ratio": cpu_off / cpu_on}


def _async_ab(llm, reqs: list[Request], rounds: int, sampling: dict | None = None) -> dict:
    """Async scheduling's gain: the same engine and workload with it on and off, interleaved (on,
    off, off, on, ...) so that drift in machine load hits both alike. On a CPU there is nothing to
    overlap (a step runs as it is launched): the two should be equal there. sampling: as
    _run_tokenmill's (greedy by default)."""
    eng = llm.engine
    # (raises where it cannot run: speculative decoding, an embedding model)
    dataclasses.replace(eng.config, async_scheduling="on").resolve_async_scheduling(eng.device, eng.task)
    saved = eng.async_scheduling
    label = "" if not sampling else " (" + ", ".join(f"{k} {v:g}" for k, v in sampling.items()) + ")"
    runs: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for i in range(2 * rounds):
            mode = "on" if i % 4 in (0, 3) else "off"
            eng.async_scheduling = mode == "on"  # (nothing is in flight between runs)
            eng.reset_prefix_cache()
            r = _run_tokenmill(llm, reqs, sampling)
            runs[mode].append(r["output_tok_s"])
            print(f"async scheduling {mode}{label}: {r['output_tok_s']:.1f} tok/s, {r['steps_per_s']:.1f} steps/s",
                  flush=True)
    finally:
        eng.async_scheduling = saved
    on, off = sum(runs["on"]) / len(runs["on"]), sum(runs["off"]) / len(runs["off"])
    print(f"async scheduling{label}: on {on:.1f} vs off {off:.1f} tok/s -> {on / off:.3f}x", flush=True)
    return {"on_tok_s": runs["on"], "off_tok_s": runs["off"], "on_mean": on, "off_mean": off, "ratio": on / off,
            "sampling": sampling or {"temperature": 0}}


def _tokenmill_decode(llm, req: Request, n: int) -> float:
    from tokenmill import SamplingParams

    out = llm.generate({"prompt_token_ids": req.prompt[:32]},
                       SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    return 1.0 / out.metrics.mean_tpot


def _load_hf(model_dir: str, args):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.load_format == "dummy":  # random weights made on the device, as tokenmill's
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device)
    model.eval()
    return model


def _hf_generate(model, batch: list[list[int]], max_new: int, device: str) -> None:
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                       min_new_tokens=max_new, do_sample=False, pad_token_id=0)


def _run_hf(model, reqs: list[Request], batch_size: int, device: str) -> dict:
    # A batch runs to its longest output: batches of similar output lengths waste few steps (the
    # lengths are known here, as a real user's are not), then of similar prompts pad little.
    reqs = sorted(reqs, key=lambda r: (r.output_len, len(r.prompt)))
    sync_device(torch.device(device))
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(reqs), batch_size), desc=f"transformers bs={batch_size}", unit="batch", leave=False):
        chunk = reqs[i : i + batch_size]
        _hf_generate(model, [r.prompt for r in chunk], max(r.output_len for r in chunk), device)
    sync_device(torch.device(device))
    dt = time.perf_counter() - t0
    out_tokens = sum(r.output_len for r in reqs)
    in_tokens = sum(len(r.prompt) for r in reqs)
    return {"seconds": dt, "output_tokens": out_tokens, "output_tok_s": out_tokens / dt,
            "total_tok_s": (out_tokens + in_tokens) / dt}


def _hf_decode(model, req: Request, n: int, device: str) -> float:
    prompt = req.prompt[:32]
    _hf_generate(model, [prompt], 2, device)  # warm up
    sync_device(torch.device(device))
    t0 = time.perf_counter()
    _hf_generate(model, [prompt], 1, device)
    sync_device(torch.device(device))
    t1 = time.perf_counter()
    _hf_generate(model, [prompt], n + 1, device)
    sync_device(torch.device(device))
    t2 = time.perf_counter()
    return n / ((t2 - t1) - (t1 - t0))
