"""`tokenmill bench latency`: batch-1 prefill and decode, and the memory bandwidth decode achieves.

Decode at batch 1 reads every weight once per token, so bytes read per token x tokens/s is
the bandwidth achieved; set beside the device's copy bandwidth and read bandwidth (measured in
the same run, tokenmill/bench/roofline.py) it says how close decode is to the limit. With --llama-bench (llama.cpp's
llama-bench binary) and --gguf (the same weights as GGUF), llama.cpp runs the same
prefill/decode lengths with the same threads in the same run, and the ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

from tokenmill.bench import check_at_least, torch_dtype, write_json
from tokenmill.bench.roofline import copy_bandwidth, read_bandwidth


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder (with --shape: written there when it "
                   "has no config.json)")
    p.add_argument("--shape", default=None, help="a published shape for a random model (tokenmill.bench.workload."
                   "SHAPES: smollm-135m, qwen2.5-0.5b, llama3-8b); with --load-format dummy only its config.json")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone (a large shape with no checkpoint at hand)")
    p.add_argument("--quantization", default=None, choices=["int8"])
    p.add_argument("--prompt-len", type=int, default=512, help="tokens prefilled in one step")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded after the prompt")
    p.add_argument("--repeats", type=int, default=3, help="runs of each; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench, to run beside")
    p.add_argument("--gguf", default=None, help="the same model as a GGUF file, for --llama-bench")
    p.add_argument("--json", default=None, help="write the figures to this file")


def weight_bytes_per_step(llm) -> int:
    """Weights a decode step reads: all but the untied embedding table, of which a row a token."""
    runner = llm.engine.runner
    model = runner.model
    weights = runner.weight_bytes
    if model.lm_head is not None:  # (untied)
        weights -= sum(p.numel() * p.element_size() for p in model.embed_tokens.parameters())
    return weights


def bytes_per_decode_token(llm, context: int) -> int:
    """Weights read for one token (weight_bytes_per_step) plus the KV cache read by attention at
    this context length."""
    runner = llm.engine.runner
    return weight_bytes_per_step(llm) + runner.kv_bytes_per_block // runner.block_size * context


def _tokenmill(args) -> dict:
    import torch

    from tokenmill import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape:
        from tokenmill.bench.workload import make_random_model

        make_random_model(args.model, shape_name=args.shape, weights=args.load_format != "dummy")
    total = args.prompt_len + args.decode_tokens
    llm = LLM(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
              load_format=args.load_format,
              max_model_len=max(total + 16, 256),
              max_num_batched_tokens=max(args.prompt_len, 256), max_num_seqs=1, enable_prefix_caching=False,
              kv_cache_memory_bytes=None)
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefill_s, decode_step_s, decode_mean_s = [], [], []
    for r in range(args.repeats + 1):  # the first run warms up
        prompt = torch.randint(10, vocab - 10, (args.prompt_len,), generator=g).tolist()
        eng.add_request({"prompt_token_ids": prompt},
                        SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        eng.step()  # the whole prompt in one step, and the first token
        eng.drain()  # (with async scheduling, step() returns with the step still on the device)
        first = time.perf_counter() - t
        steps = []
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
        if r:
            prefill_s.append(first)
            decode_step_s.append(statistics.median(steps))
            decode_mean_s.append(statistics.fmean(steps))
    prefill = statistics.median(prefill_s)
    step = statistics.median(decode_step_s)
    mean = statistics.median(decode_mean_s)
    per_token = bytes_per_decode_token(llm, args.prompt_len + args.decode_tokens // 2)
    weights = weight_bytes_per_step(llm)
    return {
        "prefill_s": prefill, "prefill_tok_s": args.prompt_len / prefill,
        "decode_tok_s": 1 / step, "decode_step_ms": step * 1e3,
        # the mean step: work done every few steps counts there (the median hides it)
        "decode_mean_tok_s": 1 / mean, "decode_mean_step_ms": mean * 1e3,
        "bytes_per_token": per_token, "bandwidth_gb_s": per_token / step / 1e9,
        "weight_bytes_per_token": weights, "weight_bandwidth_gb_s": weights / step / 1e9,
        "weight_bytes": eng.runner.weight_bytes,
    }


def _llama_bench(args) -> dict:
    threads = args.threads or os.cpu_count() or 1
    base = [args.llama_bench, "-m", args.gguf, "-t", str(threads), "-r", str(args.repeats), "-o", "json"]
    # Prefill from an empty cache, and decode at the depth tokenmill decodes at (after the prompt):
    # llama-bench's tg test otherwise starts from an empty cache, where attention costs nothing.
    prefill_cmd = base + ["-p", str(args.prompt_len), "-n", "0"]
    decode_cmd = base + ["-p", "0", "-n", str(args.decode_tokens), "-d", str(args.prompt_len)]
    res: dict = {"command": " ".join(prefill_cmd) + " && " + " ".join(decode_cmd)}
    for cmd in (prefill_cmd, decode_cmd):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        for row in json.loads(out):
            if row.get("n_prompt", 0) and not row.get("n_gen", 0):
                res["prefill_tok_s"] = row["avg_ts"]
                res["prefill_s"] = args.prompt_len / row["avg_ts"]
            elif row.get("n_gen", 0) and not row.get("n_prompt", 0):
                res["decode_tok_s"] = row["avg_ts"]
            res.setdefault("type", row.get("model_type"))
            res["model_size"] = row.get("model_size")
    return res


def run(args: argparse.Namespace) -> dict:
    check_at_least("--prompt-len", args.prompt_len)
    check_at_least("--decode-tokens", args.decode_tokens, 2)  # (the first token comes with the prefill)
    check_at_least("--repeats", args.repeats)
    if args.threads is not None:
        check_at_least("--threads", args.threads)
    torch_dtype(args.dtype)
    if bool(args.llama_bench) != bool(args.gguf):
        raise ValueError("--llama-bench and --gguf go together")
    if args.llama_bench and args.device != "cpu":
        raise ValueError("--llama-bench runs on the CPU: leave --device at cpu")
    copy_bw, read_bw = copy_bandwidth(args.device), read_bandwidth(args.device)
    ours = _tokenmill(args)
    ours["of_copy_bandwidth"] = ours["bandwidth_gb_s"] * 1e9 / copy_bw
    ours["of_read_bandwidth"] = ours["bandwidth_gb_s"] * 1e9 / read_bw
    # Issue 16's goal: weight bytes over the copy bandwidth, at the mean step (the stricter)
    ours["weights_of_copy_bandwidth"] = ours["weight_bytes_per_token"] * ours["decode_mean_tok_s"] / copy_bw
    settings = {k: v for k, v in vars(args).items() if not callable(v)}
    res = {"args": settings, "copy_bandwidth_gb_s": copy_bw / 1e9, "read_bandwidth_gb_s": read_bw / 1e9,
           "tokenmill": ours}
    label = f"{args.dtype}{' + ' + args.quantization if args.quantization else ''}"
    print(f"{args.device} bandwidth: copy {copy_bw / 1e9:.1f} GB/s (bytes read + written), "
          f"read {read_bw / 1e9:.1f} GB/s (a sum)")
    print(f"tokenmill {label}: prefill {args.prompt_len} tokens {ours['prefill_s']:.3f} s "
          f"({ours['prefill_tok_s']:.0f} tok/s); decode {ours['decode_tok_s']:.1f} tok/s "
          f"({ours['decode_step_ms']:.2f} ms/token), {ours['bytes_per_token'] / 1e6:.0f} MB/token -> "
          f"{ours['bandwidth_gb_s']:.1f} GB/s: {ours['of_copy_bandwidth']:.0%} of copy bandwidth, "
          f"{ours['of_read_bandwidth']:.0%} of read bandwidth; the weights alone at the mean step "
          f"({ours['decode_mean_step_ms']:.2f} ms): {ours['weights_of_copy_bandwidth']:.1%} of copy bandwidth")
    if args.llama_bench:
        lc = _llama_bench(args)
        res["llama_cpp"] = lc
        print(f"llama.cpp {lc.get('type')}: prefill {lc['prefill_s']:.3f} s ({lc['prefill_tok_s']:.0f} tok/s); "
              f"decode {lc['decode_tok_s']:.1f} tok/s")
        # llama-bench's avg_ts is tokens / the whole decode's time (averaged over its repetitions):
        # a mean step, so the ratio's basis is tokenmill's mean step, not its median.
        res["ratio"] = {"decode": ours["decode_mean_tok_s"] / lc["decode_tok_s"],
                        "decode_median_step": ours["decode_tok_s"] / lc["decode_tok_s"],
                        "prefill": ours["prefill_tok_s"] / lc["prefill_tok_s"]}
        print(f"ratio tokenmill/llama.cpp: decode {res['ratio']['decode']:.2f}x (tokenmill's mean step, "
              f"{ours['decode_mean_tok_s']:.1f} tok/s, as llama-bench averages; at its median step "
              f"{res['ratio']['decode_median_step']:.2f}x), prefill {res['ratio']['prefill']:.2f}x")
    write_json(args.json, res)
    return res
