"""`tokenmill bench fleet`: the router over replicas on this machine, in three parts.

- kv: a shared-prefix multi-tenant workload (K system prompts, many users, requests in random
  tenant order) on 2 replicas behind the router, with --policy round_robin, then kv_aware (fresh
  replicas for each, same requests): TTFT, throughput and each replica's prefix-cache hit rate.
  Each replica's KV cache holds about half of the system prompts, so where a request goes decides
  whether its prompt is cached.
- failover: 64 streaming greedy requests on 2 replicas through the router, once undisturbed and
  once with one replica SIGKILLed midway: failed requests, outputs against the undisturbed run
  (missing or repeated tokens), and the latency the moved requests gained.
- overhead: the same workload sent to one replica directly and through the router over it,
  alternately (after one pass that warms the replica up), --overhead-rounds times each: the
  median throughput through the router against direct.

Replicas are `tokenmill serve` processes of a random SmolLM-135M-shaped model (written to --model
when it has no config.json), prompts are token ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from tokenmill.bench import check_at_least, write_json
from tokenmill.bench.prefix_cache import _cache_counters, _prepare_model
from tokenmill.stats import percentile_summary

SERVED = "bench"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="kv,failover,overhead", help="comma-separated: kv, failover, overhead")
    p.add_argument("--model", help="model folder (default: a random SmolLM-135M-shaped model in a temp dir)")
    p.add_argument("--replica-threads", type=int, default=1, help="torch threads per replica (kv, failover)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="the replicas' (default: the model's)")
    # kv
    p.add_argument("--num-prefixes", type=int, default=8, help="kv: distinct system prompts (tenants)")
    p.add_argument("--prefix-len", type=int, default=1024, help="kv: tokens per system prompt")
    p.add_argument("--question-len", type=int, default=64, help="kv: tokens per user question")
    p.add_argument("--num-prompts", type=int, default=160, help="kv: requests")
    p.add_argument("--output-len", type=int, default=32, help="kv: output tokens per request (+-50%%)")
    p.add_argument("--max-concurrency", type=int, default=16, help="kv and overhead: requests in flight")
    p.add_argument("--cache-prefixes", type=float, default=4.5,
                   help="kv: each replica's KV cache holds this many system prompts (plus the running requests)")
    # failover
    p.add_argument("--failover-requests", type=int, default=64)
    p.add_argument("--failover-output-len", type=int, default=128)
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="failover: SIGKILL a replica when this fraction of the output tokens has streamed")
    # overhead
    p.add_argument("--overhead-threads", type=int, default=2, help="overhead: torch threads of the one replica")
    p.add_argument("--overhead-requests", type=int, default=96)
    p.add_argument("--overhead-rounds", type=int, default=3, help="overhead: runs of each way (medians reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all figures to this file")
    p.add_argument("--log-dir", help="replica and router logs (default: a temp dir)")


# -- processes -----------------------------------------------------------------------------------------
class _Proc:
    def __init__(self, args: list[str], log_path: str, threads: int | None = None) -> None:
        from tokenmill.server.serve import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "--log-level", "warning", *args,
                                      "--port", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait(self) -> _Proc:
        from tokenmill.server.serve import wait_healthy

        try:
            wait_healthy(self.proc, self.url, 600, lambda: f": see {self.log_path}")
        except BaseException:  # (SystemExit from a SIGTERM too: a caller's finally may not know of it yet)
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()  # (a second stop() does nothing more)


def _replica(model: str, args: argparse.Namespace, log: str, threads: int, kv_gib: float | None) -> _Proc:
    cmd = ["serve", "--model", model, "--served-model-name", SERVED, "--seed", str(args.seed)]
    if kv_gib is not None:
        cmd += ["--kv-cache-memory", f"{kv_gib:.4f}"]
    for flag, v in (("--max-num-batched-tokens", args.max_num_batched_tokens), ("--max-model-len", args.max_model_len)):
        if v:
            cmd += [flag, str(v)]
    return _Proc(cmd, log, threads)


def _router(replicas: list[_Proc], policy: str, log: str, model: str) -> _Proc:
    cmd = ["router", "--policy", policy, "--tokenizer", model, "--health-interval", "0.5"]
    for r in replicas:
        cmd += ["--replica", r.url]
    return _Proc(cmd, log)


def _wait_synced(router: _Proc, n: int, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        text = httpx.get(router.url + "/metrics", timeout=10).text
        up = sum(1 for ln in text.splitlines() if ln.startswith("tokenmill_router:replica_up{") and ln.endswith(" 1.0"))
        synced = sum(1 for ln in text.splitlines()
                     if ln.startswith("tokenmill_router:replica_kv_events_synced{") and ln.endswith(" 1.0"))
        if up == synced == n:
            return
        time.sleep(0.1)
    raise RuntimeError("the router did not see every replica")


def _kv_bytes_per_token(model: str) -> int:
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * kv_heads * head_dim * 4  # float32


# -- load ----------------------------------------------------------------------------------------------
async def _load(base: str, reqs: list[tuple[list[int], int]], concurrency: int, record: bool = False,
                on_token: Any = None) -> dict[str, Any]:
    """Streams every request (greedy, ignore_eos) with at most `concurrency` in flight; per request its
    TTFT, latency, token ids and whether it moved (the router's failover object)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = [{} for _ in reqs]

    async def one(i: int, http: httpx.AsyncClient) -> None:
        ids, n_out = reqs[i]
        body = {"model": SERVED, "prompt": ids, "max_tokens": n_out, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        r = results[i]
        last_token: list[float | None] = [None]
        async with sem:
            t0 = time.perf_counter()
            r.update(ok=False, tokens=[], failover=None, cached=0)
            try:
                async with http.stream("POST", base + "/v1/completions", json=body) as resp:
                    r["replica"] = resp.headers.get("x-tokenmill-replica")
                    if resp.status_code != 200:
                        r["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                        return
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            r["error"] = ev["error"]["message"]
                            continue
                        if ev.get("failover"):
                            if r["failover"] is None and last_token[0] is not None:
                                # the stream's pause while it moved: last token before, first after
                                r["switch_gap"] = time.perf_counter() - last_token[0]
                            r["failover"] = ev["failover"]
                        if ev.get("usage"):
                            r["cached"] = (ev["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                        for ch in ev.get("choices", []):
                            new = ch.get("token_ids") or []
                            if new and "ttft" not in r:
                                r["ttft"] = time.perf_counter() - t0
                            if new:
                                last_token[0] = time.perf_counter()
                            r["tokens"] += new
                            if on_token is not None and new:
                                on_token(len(new), results)
                r["ok"] = "error" not in r and len(r["tokens"]) == n_out
                if not r["ok"] and "error" not in r:
                    r["error"] = f"{len(r['tokens'])} of {n_out} tokens"
            except httpx.HTTPError as e:
                r["error"] = f"{type(e).__name__}: {e}"
            finally:
                r["e2e"] = time.perf_counter() - t0

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, http) for i in range(len(reqs))))
        wall = time.perf_counter() - t0
    done = [r for r in results if r["ok"]]
    out_tokens = sum(len(r["tokens"]) for r in done)
    prompt = sum(len(reqs[i][0]) for i, r in enumerate(results) if r["ok"])
    summary = {
        "requests": len(reqs), "completed": len(done), "failed": len(reqs) - len(done), "wall_s": wall,
        "request_throughput": len(done) / wall, "output_throughput": out_tokens / wall,
        "ttft_ms": percentile_summary([r["ttft"] * 1000 for r in done if "ttft" in r]),
        "e2e_ms": percentile_summary([r["e2e"] * 1000 for r in done]),
        "client_hit_rate": sum(r["cached"] for r in done) / prompt if prompt else None,
        "errors": sorted({str(r.get("error")) for r in results if not r["ok"]})[:5],
    }
    if record:
        summary["results"] = results
    return summary


def _shared_prefix(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(10, vocab) for _ in range(args.prefix_len)] for _ in range(args.num_prefixes)]
    reqs = []
    for _ in range(args.num_prompts):
        tenant = rng.randrange(args.num_prefixes)  # users of every tenant arrive in random order
        q = [rng.randrange(10, vocab) for _ in range(args.question_len)]
        reqs.append((prefixes[tenant] + q, max(1, int(args.output_len * rng.uniform(0.5, 1.5)))))
    return reqs


def _random_prompts(n: int, vocab: int, seed: int, prompt_len: int, out_len: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(int(prompt_len * rng.uniform(0.5, 1.5)))], out_len)
            for _ in range(n)]


# -- parts ---------------------------------------------------------------------------------------------
def part_kv(args: argparse.Namespace, model: str, vocab: int, logs: str) -> dict[str, Any]:
    reqs = _shared_prefix(args, vocab)
    # Each replica caches about --cache-prefixes system prompts, plus what its running requests hold.
    per_token = _kv_bytes_per_token(model)
    tokens = args.cache_prefixes * args.prefix_len + args.max_concurrency * (args.question_len + 2 * args.output_len)
    kv_gib = tokens * per_token / 2**30
    out: dict[str, Any] = {"kv_cache_gib_per_replica": kv_gib, "kv_cache_tokens_per_replica": int(tokens)}
    for policy in ("round_robin", "kv_aware"):
        reps: list[_Proc] = []
        router = None
        try:
            for i in range(2):  # (in the try: a SIGTERM between the two starts stops the first)
                reps.append(_replica(model, args, f"{logs}/kv-{policy}-r{i}.log", args.replica_threads, kv_gib))
            for r in reps:
                r.wait()
            router = _router(reps, policy, f"{logs}/kv-{policy}-router.log", model).wait()
            _wait_synced(router, 2)
            # warm both replicas' first steps with prompts that share nothing with the workload
            asyncio.run(_load(router.url, _random_prompts(4, vocab, 999, 16, 2), 4))
            before = [_cache_counters(r.url) or (0.0, 0.0) for r in reps]
            s = asyncio.run(_load(router.url, reqs, args.max_concurrency))
            after = [_cache_counters(r.url) or (0.0, 0.0) for r in reps]
            s["replica_hit_rate"] = [(a[1] - b[1]) / (a[0] - b[0]) if a[0] > b[0] else None
                                     for a, b in zip(after, before)]
            s["replica_prompt_tokens"] = [a[0] - b[0] for a, b in zip(after, before)]
            out[policy] = s
            print(f"kv {policy}: TTFT p50 {s['ttft_ms'].get('p50', float('nan')):.0f} ms, "
                  f"{s['request_throughput']:.2f} req/s, hit rates {s['replica_hit_rate']}", flush=True)
        finally:
            for p in [router, *reps]:
                if p is not None:
                    p.stop()
    rr, kv = out["round_robin"], out["kv_aware"]
    # (None where a policy completed nothing: percentile_summary gives {} for no values)
    out["ttft_p50_ratio_rr_over_kv"] = _ratio(rr["ttft_ms"].get("p50"), kv["ttft_ms"].get("p50"))
    out["throughput_ratio_kv_over_rr"] = _ratio(kv["request_throughput"], rr["request_throughput"])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def part_failover(args: argparse.Namespace, model: str, vocab: int, logs: str) -> dict[str, Any]:
    reqs = _random_prompts(args.failover_requests, vocab, args.seed + 1, 128, args.failover_output_len)
    reps: list[_Proc] = []
    router = None
    try:
        for i in range(2):
            reps.append(_replica(model, args, f"{logs}/failover-r{i}.log", args.replica_threads, None))
        for r in reps:
            r.wait()
        router = _router(reps, "kv_aware", f"{logs}/failover-router.log", model).wait()
        _wait_synced(router, 2)
        asyncio.run(_load(router.url, _random_prompts(4, vocab, 999, 16, 2), 4))
        clean = asyncio.run(_load(router.url, reqs, len(reqs), record=True))
        total = sum(n for _, n in reqs)
        streamed = [0]
        killed: list[str] = []

        def on_token(n: int, results: list[dict[str, Any]]) -> None:
            streamed[0] += n
            if not killed and streamed[0] >= args.kill_at * total:
                # the replica with the most streams still going (routing decides how many each has)
                busy = Counter(r.get("replica") for r in results if r and "e2e" not in r)
                victim = max(reps, key=lambda p: busy.get(p.url, 0))
                victim.proc.send_signal(signal.SIGKILL)
                killed.append(victim.url)

        hit = asyncio.run(_load(router.url, reqs, len(reqs), record=True, on_token=on_token))
    finally:
        for p in [router, *reps]:
            if p is not None:
                p.stop()
    a, b = clean.pop("results"), hit.pop("results")
    same = sum(x["tokens"] == y["tokens"] for x, y in zip(a, b))
    missing = sum(max(0, len(x["tokens"]) - len(y["tokens"])) for x, y in zip(a, b))
    extra = sum(max(0, len(y["tokens"]) - len(x["tokens"])) for x, y in zip(a, b))
    moved = [i for i, y in enumerate(b) if y["failover"]]
    added = [(b[i]["e2e"] - a[i]["e2e"]) * 1000 for i in moved]
    out = {"clean": clean, "with_kill": hit, "killed": killed, "identical_outputs": same, "requests": len(reqs),
           "missing_tokens": missing, "extra_tokens": extra, "moved_requests": len(moved),
           "resumed_at_tokens": percentile_summary([float(b[i]["failover"]["resumed_at_token"]) for i in moved]),
           "added_latency_ms": percentile_summary(added),
           "switch_gap_ms": percentile_summary([b[i]["switch_gap"] * 1000 for i in moved if "switch_gap" in b[i]]),
           "clean_e2e_of_moved_ms": percentile_summary([a[i]["e2e"] * 1000 for i in moved])}
    print(f"failover: {hit['failed']} failed, {same}/{len(reqs)} identical to the clean run, {len(moved)} moved, "
          f"added latency p50 {out['added_latency_ms'].get('p50', float('nan')):.0f} ms", flush=True)
    return out


def part_overhead(args: argparse.Namespace, model: str, vocab: int, logs: str) -> dict[str, Any]:
    reqs = _random_prompts(args.overhead_requests, vocab, args.seed + 2, 128, 64)
    rep = _replica(model, args, f"{logs}/overhead-r.log", args.overhead_threads, None)
    router = None
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "router": []}
    try:
        rep.wait()
        router = _router([rep], "kv_aware", f"{logs}/overhead-router.log", model).wait()
        _wait_synced(router, 1)
        # One whole pass first (the replica's first large batches run slower), then the two ways
        # alternately, each going first in turn.
        asyncio.run(_load(rep.url, reqs, args.max_concurrency))
        for k in range(args.overhead_rounds):
            ways = (("direct", rep.url), ("router", router.url))
            for name, url in (ways if k % 2 == 0 else ways[::-1]):
                s = asyncio.run(_load(url, reqs, args.max_concurrency))
                runs[name].append(s)
                print(f"overhead {name}: {s['output_throughput']:.1f} tok/s, TTFT p50 "
                      f"{s['ttft_ms'].get('p50', float('nan')):.1f} ms", flush=True)
    finally:
        for p in [router, rep]:
            if p is not None:
                p.stop()
    d = statistics.median(s["output_throughput"] for s in runs["direct"])
    r = statistics.median(s["output_throughput"] for s in runs["router"])

    def ttft_p50(v: list[dict[str, Any]]) -> float | None:  # (over the runs that completed something)
        p50s = [s["ttft_ms"]["p50"] for s in v if "p50" in s["ttft_ms"]]
        return statistics.median(p50s) if p50s else None

    return {"direct": runs["direct"], "router": runs["router"], "direct_tok_s": d, "router_tok_s": r,
            "throughput_ratio_router_over_direct": _ratio(r, d),
            "ttft_p50_ms": {k: ttft_p50(v) for k, v in runs.items()}}


def check_args(args: argparse.Namespace, parts: list[str]) -> None:
    """Fails on bad counts before any replica starts."""
    counts = [("--replica-threads", args.replica_threads), ("--max-concurrency", args.max_concurrency)]
    if "kv" in parts:
        counts += [("--num-prefixes", args.num_prefixes), ("--prefix-len", args.prefix_len),
                   ("--question-len", args.question_len), ("--num-prompts", args.num_prompts),
                   ("--output-len", args.output_len)]
        if not args.cache_prefixes > 0:
            raise ValueError(f"--cache-prefixes must be > 0, got {args.cache_prefixes:g}")
    if "failover" in parts:
        counts += [("--failover-requests", args.failover_requests),
                   ("--failover-output-len", args.failover_output_len)]
        if not 0 < args.kill_at < 1:
            raise ValueError(f"--kill-at must be in (0, 1), got {args.kill_at:g}")
    if "overhead" in parts:
        counts += [("--overhead-threads", args.overhead_threads), ("--overhead-requests", args.overhead_requests),
                   ("--overhead-rounds", args.overhead_rounds)]
    for flag, value in counts:
        check_at_least(flag, value)


def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("kv", "failover", "overhead")]
    if bad or not parts:
        raise ValueError(f"--parts: unknown {', '.join(bad)} (kv, failover, overhead)" if bad else
                         "--parts: one or more of kv, failover, overhead")
    check_args(args, parts)
    model = _prepare_model(args.model or os.path.join(tempfile.mkdtemp(prefix="tokenmill-fleet-"), "model"))
    with open(os.path.join(model, "config.json")) as f:
        vocab = int(json.load(f)["vocab_size"])
    logs = args.log_dir or tempfile.mkdtemp(prefix="tokenmill-fleet-logs-")
    os.makedirs(logs, exist_ok=True)
    print(f"model {model}, logs in {logs}", flush=True)
    flags = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))}
    out: dict[str, Any] = {"model": model, "cpu_count": os.cpu_count(), "args": flags}
    for part, fn in (("kv", part_kv), ("failover", part_failover), ("overhead", part_overhead)):
        if part in parts:
            out[part] = fn(args, model, vocab, logs)
            write_json(args.json, out)
    print(format_report(out))
    write_json(args.json, out)
    return out


def format_report(out: dict[str, Any]) -> str:
    lines = []
    if "kv" in out:
        kv = out["kv"]
        lines.append("shared-prefix workload on 2 replicas   round_robin   kv_aware")
        for label, key in (("TTFT p50 (ms)", ("ttft_ms", "p50")), ("TTFT p90 (ms)", ("ttft_ms", "p90"))):
            rr, kva = (_num(kv[p][key[0]].get(key[1]), ".0f") for p in ("round_robin", "kv_aware"))
            lines.append(f"  {label:<36} {rr:>11} {kva:>10}")
        for label, key in (("requests/s", "request_throughput"), ("output tokens/s", "output_throughput")):
            lines.append(f"  {label:<36} {kv['round_robin'][key]:>11.2f} {kv['kv_aware'][key]:>10.2f}")
        rr_h = ", ".join(f"{x:.0%}" if x is not None else "-" for x in kv["round_robin"]["replica_hit_rate"])
        kv_h = ", ".join(f"{x:.0%}" if x is not None else "-" for x in kv["kv_aware"]["replica_hit_rate"])
        lines.append(f"  {'prefix-cache hit rate per replica':<36} {rr_h:>11} {kv_h:>10}")
        lines.append(f"  TTFT p50 round_robin / kv_aware: {_num(kv['ttft_p50_ratio_rr_over_kv'], '.2f', 'x')}; "
                     f"throughput kv_aware / round_robin: {_num(kv['throughput_ratio_kv_over_rr'], '.2f', 'x')}")
    if "failover" in out:
        f = out["failover"]
        lines.append(f"failover: {f['with_kill']['failed']} failed of {f['requests']}; {f['identical_outputs']} "
                     f"identical to the undisturbed run; {f['missing_tokens']} tokens missing, {f['extra_tokens']} "
                     f"extra; {f['moved_requests']} moved, added latency p50 "
                     f"{f['added_latency_ms'].get('p50', float('nan')):.0f} ms (their undisturbed e2e p50 "
                     f"{f['clean_e2e_of_moved_ms'].get('p50', float('nan')):.0f} ms); the stream's pause at the move "
                     f"p50 {f['switch_gap_ms'].get('p50', float('nan')):.0f} ms, max "
                     f"{f['switch_gap_ms'].get('max', float('nan')):.0f} ms")
    if "overhead" in out:
        o = out["overhead"]
        lines.append(f"overhead: direct {o['direct_tok_s']:.1f} tok/s, through the router {o['router_tok_s']:.1f} "
                     f"tok/s ({_num(o['throughput_ratio_router_over_direct'], '.3f', 'x')})")
    return "\n".join(lines)


def _num(x: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{unit}"
