"""Is the HTTP layer the bottleneck? The same requests through the offline engine and through
`tokenmill serve` with C concurrent streaming clients, on the same random model.

Both sides run the same engine settings, including max_num_seqs = C, so the batch sizes match
and the difference is what serving costs: HTTP, JSON, SSE, the engine thread hand-off.
Clients are light (raw SSE lines, httpx) because they share the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from tokenmill.bench import check_at_least, torch_dtype, write_json
from tokenmill.bench.datasets import Request, token_id_requests
from tokenmill.bench.workload import make_random_model, save_synthetic_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder; without config.json a random SmolLM-135M-shaped Llama is written "
                   "there (default: a temp dir); a synthetic tokenizer is added when it has none")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="streaming clients (and the engine's max_num_seqs)")
    p.add_argument("--input-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-cache-memory", type=float, default=2.0, metavar="GIB")
    p.add_argument("--json", help="write the figures to this file")


def run(args: argparse.Namespace) -> dict:
    check_at_least("--num-prompts", args.num_prompts)
    check_at_least("--concurrency", args.concurrency)
    check_at_least("--max-num-batched-tokens", args.max_num_batched_tokens)
    for flag, (lo, hi) in (("--input-len", args.input_len), ("--output-len", args.output_len)):
        check_at_least(f"{flag} MIN", lo)
        if hi < lo:
            raise ValueError(f"{flag}: MAX ({hi}) is below MIN ({lo})")
    if not args.kv_cache_memory > 0:
        raise ValueError(f"--kv-cache-memory must be > 0, got {args.kv_cache_memory:g}")
    torch_dtype(args.dtype)
    model_dir = make_random_model(args.model or tempfile.mkdtemp(prefix="tokenmill-bench-"))
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    save_synthetic_tokenizer(model_dir, vocab)
    reqs = token_id_requests(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, args.seed)
    results: dict = {"model": model_dir, "num_prompts": len(reqs), "concurrency": args.concurrency}

    offline = _run_offline(model_dir, reqs, args)
    results["offline"] = offline
    print(f"offline engine: {offline['output_tokens']} output tokens in {offline['seconds']:.1f}s "
          f"= {offline['output_tok_s']:.1f} tok/s", flush=True)

    server = _run_server(model_dir, reqs, args)
    results["server"] = server
    print(f"server, {args.concurrency} streaming clients: {server['output_tokens']} output tokens in "
          f"{server['seconds']:.1f}s = {server['output_tok_s']:.1f} tok/s "
          f"({server['chunks']} SSE chunks, {server['failed']} failed)", flush=True)
    ratio = server["output_tok_s"] / offline["output_tok_s"]
    results["ratio"] = ratio
    print(f"\nserver / offline output throughput: {ratio:.1%} (goal >= 80%)")
    write_json(args.json, results)
    return results


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_num_seqs=args.concurrency,
                max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                kv_cache_memory_bytes=int(args.kv_cache_memory * 2**30))


def _run_offline(model_dir: str, reqs: list[Request], args: argparse.Namespace) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model_dir, **_engine_kwargs(args))
    llm.generate({"prompt_token_ids": reqs[0].prompt[:16]}, SamplingParams(max_tokens=2))  # warm-up
    prompts = [{"prompt_token_ids": r.prompt} for r in reqs]
    params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    return {"output_tokens": tokens, "seconds": seconds, "output_tok_s": tokens / seconds}


def _run_server(model_dir: str, reqs: list[Request], args: argparse.Namespace) -> dict:
    from tokenmill.server.serve import free_port, wait_healthy

    port = free_port()
    kw = _engine_kwargs(args)
    cmd = [sys.executable, "-m", "tokenmill.cli", "--log-level", "warning", "serve", "--model", model_dir,
           "--port", str(port), "--dtype", kw["dtype"], "--device", kw["device"],
           "--max-num-seqs", str(kw["max_num_seqs"]), "--max-num-batched-tokens", str(kw["max_num_batched_tokens"]),
           "--seed", str(kw["seed"]), "--kv-cache-memory", str(args.kv_cache_memory), "--served-model-name", "bench"]
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, 300)
        return asyncio.run(_drive(base, reqs, args.concurrency))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _drive(base: str, reqs: list[Request], concurrency: int) -> dict:
    import httpx
    from tqdm import tqdm

    queue = list(reversed(reqs))
    totals = {"output_tokens": 0, "chunks": 0, "failed": 0}
    bar = tqdm(total=len(reqs), desc="server", unit="req", leave=False)

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            r = queue.pop()
            body = {"model": "bench", "prompt": r.prompt, "max_tokens": r.output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            last = None
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    totals["failed"] += 1
                    await resp.aread()
                    continue
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        totals["chunks"] += 1
                        last = line
            bar.update(1)
            usage = json.loads(last[6:]).get("usage") if last else None
            if usage:
                totals["output_tokens"] += usage["completion_tokens"]
            else:
                totals["failed"] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        await http.post("/v1/completions", json={"model": "bench", "prompt": reqs[0].prompt[:16],
                                                 "max_tokens": 2})  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    bar.close()
    return {**totals, "seconds": seconds, "output_tok_s": totals["output_tokens"] / seconds}
