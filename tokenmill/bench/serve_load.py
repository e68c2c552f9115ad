"""`tokenmill bench serve`: a load generator for any OpenAI-compatible server.

Requests are sent on a seeded arrival schedule (Poisson, or gamma with --burstiness) and
streamed; per request the client records TTFT (send to the first chunk carrying text),
inter-token latencies (gaps between text chunks), E2E latency, and token counts from the
server's `usage`; TPOT = (E2E - TTFT) / (output tokens - 1). Failed requests are counted
and their errors shown, never dropped. The flag names follow vLLM's benchmark_serving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from tokenmill.bench.datasets import Request, arrival_times, file_requests, random_requests, synthetic_chat_requests

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", choices=["random", "synthetic-chat", "file"], default="synthetic-chat")
    p.add_argument("--dataset-path", help="JSONL for --dataset file: {\"prompt\": ..., \"output_len\": N} per line")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len * [1-r, 1+r]")
    p.add_argument("--random-token-ids", action="store_true",
                   help="random prompts as token ids (exact lengths; completions endpoint only)")
    p.add_argument("--vocab-size", type=int, default=32000, help="id range for --random-token-ids")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="a common prefix of this many tokens")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s ('inf': all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly each request's output length")
    p.add_argument("--slo", default="", help="goodput targets, e.g. ttft_ms=500,tpot_ms=100,e2el_ms=20000")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--sweep", help="comma-separated request rates (e.g. 1,2,4,inf): one run per rate")
    p.add_argument("--plot-dir", help="with --sweep: write PNG plots here")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itls: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def parse_slo(text: str) -> dict[str, float]:
    slo = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = part.partition("=")
        if key not in ("ttft_ms", "tpot_ms", "e2el_ms") or not value:
            raise ValueError(f"--slo: expected ttft_ms=..., tpot_ms=..., e2el_ms=..., got {part!r}")
        slo[key] = float(value)
    return slo


def build_requests(args: argparse.Namespace) -> list[Request]:
    if args.dataset == "random":
        vocab = args.vocab_size if args.random_token_ids else None
        if vocab and args.endpoint == "chat":
            raise ValueError("--random-token-ids works with --endpoint completions only")
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, vocab, args.shared_prefix_len)
    if args.dataset == "synthetic-chat":
        return synthetic_chat_requests(args.num_prompts, args.seed, args.shared_prefix_len)
    if not args.dataset_path:
        raise ValueError("--dataset file needs --dataset-path")
    return file_requests(args.dataset_path, args.num_prompts)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    v = sorted(values)

    def pct(q: float) -> float:  # linear interpolation, as numpy's default
        pos = (len(v) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return {"mean": sum(v) / len(v), "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float], rate: float) -> dict:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out = {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "completed": len(done), "failed": len(failed), "duration_s": duration,
        "errors": dict(Counter(r.error for r in failed).most_common(10)),
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": sum(r.output_tokens for r in done),
        "request_throughput": len(done) / duration,
        "input_throughput": sum(r.prompt_tokens for r in done) / duration,
        "output_throughput": sum(r.output_tokens for r in done) / duration,
        "ttft_ms": _percentiles([r.ttft * 1000 for r in done]),
        "tpot_ms": _percentiles([r.tpot * 1000 for r in done if r.tpot is not None]),
        "itl_ms": _percentiles([x * 1000 for r in done for x in r.itls]),
        "e2el_ms": _percentiles([r.e2el * 1000 for r in done]),
    }
    good = 0
    for r in done:
        checks = {"ttft_ms": r.ttft * 1000, "tpot_ms": (r.tpot or 0.0) * 1000, "e2el_ms": r.e2el * 1000}
        good += all(checks[k] <= target for k, target in slo.items())
    out["goodput"] = {"request_rate": good / duration, "fraction": good / max(1, len(results)), "slo": slo}
    return out


async def _first_model(http, base: str) -> str:
    r = await http.get(base + "/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _one(http, url: str, body: dict, timeout: float) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with http.stream("POST", url, json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                try:
                    msg = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = text[:200]
                res.error = f"HTTP {resp.status_code}: {msg[:120]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {chunk['error'].get('message', '')[:120]}"
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itls.append(now - last)
                        last = now
        res.e2el = time.perf_counter() - start
        if last is None:
            res.ttft = res.e2el  # nothing but empty chunks: the first token came with the end
        res.ok = res.output_tokens > 0 or last is not None
        if not res.ok:
            res.error = "no output"
    except Exception as e:  # a dropped connection or a timeout is a failed request, counted below
        res.error = f"{type(e).__name__}: {str(e)[:120]}"
    return res


async def run_once(args: argparse.Namespace, reqs: list[Request], rate: float, model: str | None = None,
                   progress: bool = True) -> dict:
    import httpx
    from tqdm import tqdm

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000, max_keepalive_connections=100)
    slo = parse_slo(args.slo)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as http:
        model = model or args.model or await _first_model(http, base)
        url = base + ("/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions")
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        schedule = arrival_times(len(reqs), rate, args.burstiness, args.seed)
        bar = tqdm(total=len(reqs), desc=f"rate {rate:g}", unit="req", leave=False, disable=not progress)

        def body(r: Request) -> dict:
            b = {"model": model, "max_tokens": r.output_len, "stream": True, "temperature": 0.0,
                 "stream_options": {"include_usage": True}}
            if args.ignore_eos:
                b["ignore_eos"] = True
            if args.endpoint == "completions":
                b["prompt"] = r.prompt
            else:
                b["messages"] = [{"role": "user", "content": r.prompt}]
            return b

        async def send(r: Request, at: float, t0: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            if sem is None:
                res = await _one(http, url, body(r), args.timeout)
            else:
                async with sem:
                    res = await _one(http, url, body(r), args.timeout)
            bar.update(1)
            return res

        t0 = time.perf_counter()
        results = await asyncio.gather(*(send(r, at, t0) for r, at in zip(reqs, schedule)))
        duration = time.perf_counter() - t0
        bar.close()
    out = summarize(list(results), duration, slo, rate)
    out["model"] = model
    return out


def format_report(s: dict) -> str:
    lines = [
        f"{'=' * 20} serving benchmark (rate {s['request_rate']}) {'=' * 20}",
        f"{'completed requests:':<34}{s['completed']}",
        f"{'failed requests:':<34}{s['failed']}",
    ]
    for err, n in s["errors"].items():
        lines.append(f"    {n} x {err}")
    lines += [
        f"{'duration (s):':<34}{s['duration_s']:.2f}",
        f"{'total input tokens:':<34}{s['total_input_tokens']}",
        f"{'total output tokens:':<34}{s['total_output_tokens']}",
        f"{'request throughput (req/s):':<34}{s['request_throughput']:.3f}",
        f"{'input throughput (tok/s):':<34}{s['input_throughput']:.1f}",
        f"{'output throughput (tok/s):':<34}{s['output_throughput']:.1f}",
        f"{'goodput (req/s):':<34}{s['goodput']['request_rate']:.3f}"
        f"  ({s['goodput']['fraction']:.1%} of requests meet {s['goodput']['slo'] or 'no SLO'})",
        f"{'':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2el_ms", "E2E (ms)")):
        v = s[key]
        lines.append(f"{label:<14}{v['mean']:>10.1f}{v['median']:>10.1f}{v['p90']:>10.1f}{v['p99']:>10.1f}")
    return "\n".join(lines)


def plot_sweep(results: list[dict], plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    xs = [r["output_throughput"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency")):
        for stat, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [r[key][stat] for r in results], style, label=stat)
        ax.set_xlabel("achieved output throughput (tok/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    latency = os.path.join(plot_dir, "latency_vs_throughput.png")
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    offered = [r["offered_rate"] for r in results]
    finite = [o for o in offered if not math.isinf(o)]
    inf_x = (max(finite) * 1.5 if finite else 1.0)
    ox = [inf_x if math.isinf(o) else o for o in offered]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(ox, [r["goodput"]["request_rate"] for r in results], "o-", label="goodput")
    ax.plot(ox, [r["request_throughput"] for r in results], "s--", label="completed req/s")
    ax.set_xlabel("offered request rate (req/s)" + (f"; 'inf' drawn at {inf_x:g}" if any(map(math.isinf, offered))
                                                   else ""))
    ax.set_ylabel("requests/s")
    ax.set_title(f"goodput vs offered rate (SLO {results[0]['goodput']['slo'] or 'none'})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    good = os.path.join(plot_dir, "goodput_vs_rate.png")
    fig.savefig(good, dpi=110)
    plt.close(fig)
    return [latency, good]


def run(args: argparse.Namespace) -> dict | list[dict]:
    if args.plot_dir and not args.sweep:
        raise ValueError("--plot-dir needs --sweep")
    parse_slo(args.slo)  # fail on a bad --slo before sending anything
    reqs = build_requests(args)
    if args.sweep:
        rates = [float(x) for x in args.sweep.split(",") if x.strip()]
        results = []
        for rate in rates:
            s = asyncio.run(run_once(args, reqs, rate))
            s["offered_rate"] = rate
            print(format_report(s), flush=True)
            results.append(s)
        print(f"\n{'rate':>6} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
              f"{'TPOT p99':>9} {'E2E p50':>9} {'goodput':>8} {'failed':>6}")
        for s in results:
            print(f"{s['offered_rate']:>6g} {s['request_throughput']:>8.3f} {s['output_throughput']:>10.1f} "
                  f"{s['ttft_ms']['median']:>9.0f} {s['ttft_ms']['p99']:>9.0f} {s['tpot_ms']['median']:>9.0f} "
                  f"{s['tpot_ms']['p99']:>9.0f} {s['e2el_ms']['median']:>9.0f} "
                  f"{s['goodput']['request_rate']:>8.3f} {s['failed']:>6}")
        if args.plot_dir:
            for path in plot_sweep(results, args.plot_dir):
                print(f"wrote {path}")
        _write_json(args.json, [_jsonable(s) for s in results])
        return results
    s = asyncio.run(run_once(args, reqs, args.request_rate))
    print(format_report(s))
    _write_json(args.json, _jsonable(s))
    return s


def _jsonable(s: dict) -> dict:
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in s.items()}


def _write_json(path: str | None, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
