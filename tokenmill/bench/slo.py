"""`tokenmill bench slo`: interactive latency targets under overload, fcfs against slo.

One workload, two servers that differ only in --scheduling-policy:
1. An unloaded baseline (on a fcfs server): interactive requests one at a time; their targets are
   --target-factor x the baseline's TTFT p50 and TPOT p50.
2. Capacity: --capacity-requests mixed requests sent at once; capacity = requests / makespan.
3. For each policy, a fresh server gets a Poisson stream at --load x capacity for --duration
   seconds: --interactive-share of the requests are interactive (short prompts and answers, the
   targets in their `slo` field), the rest batch (long ones, no targets). Requests still running
   when the window closes are cancelled.

Reported per policy: interactive attainment (the share of interactive requests that arrived in
the first 90% of the window and met both targets; unfinished ones missed), their TTFT and TPOT
percentiles, batch output tokens/s within the window, and the server's own slo counters. The
batch throughput loss is 1 - slo's batch tokens/s / fcfs's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.bench import check_at_least, write_json
from tokenmill.stats import percentile_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder (default: a random SmolLM-135M-shaped model made in a temp folder)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of offered load per policy")
    p.add_argument("--load", type=float, default=2.0, help="offered load as a multiple of the measured capacity")
    p.add_argument("--interactive-share", type=float, default=0.3)
    p.add_argument("--target-factor", type=float, default=3.0,
                   help="targets = this x the unloaded baseline's TTFT p50 and TPOT p50")
    p.add_argument("--interactive-len", default="64,24", metavar="PROMPT,OUTPUT",
                   help="interactive prompt and output tokens (each uniform in +-25%%)")
    p.add_argument("--batch-len", default="384,96", metavar="PROMPT,OUTPUT", help="batch prompt and output tokens")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--baseline-requests", type=int, default=10)
    p.add_argument("--capacity-requests", type=int, default=48)
    p.add_argument("--policies", default="fcfs,slo")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all figures to this file")
    p.add_argument("--log-dir", help="server logs (default: a temp dir)")
    p.add_argument("--simulate", action="store_true",
                   help="no servers: the same phases with the scheduler on a simulated clock, each step taking what "
                        "the step-time model predicts (tokenmill/bench/slo_sim.py): what the policies reach with "
                        "exact predictions and nothing but the model's steps")
    p.add_argument("--step-model", metavar="STEP,TOKEN,ROW,ATTN",
                   help="with --simulate: the model's coefficients in seconds (a step, a token, a sampled row, 1k "
                        "attention pairs); default: calibrated on --model here, the engine's overhead per step "
                        "added to the first")


@dataclass
class _Req:
    kind: str  # "interactive" | "batch"
    prompt: list[int]
    max_tokens: int
    at: float = 0.0  # arrival, seconds into the window


@dataclass
class _Res:
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    done_at: float | None = None  # seconds into the window
    token_times: list[float] = field(default_factory=list)  # seconds into the window, one per chunk
    chunk_tokens: list[int] = field(default_factory=list)  # the tokens each chunk carried

    @property
    def tokens(self) -> int:
        """Output tokens received."""
        return sum(self.chunk_tokens)

    def tokens_by(self, t: float) -> int:
        """Output tokens received by `t` seconds into the window."""
        return sum(n for at, n in zip(self.token_times, self.chunk_tokens) if at <= t)

    def tpot(self, num_tokens: int) -> float | None:
        """The mean time per output token after the first, from the first chunk to the last (a
        slow reader's chunk may carry several tokens: divided by the tokens, not the chunks)."""
        if not self.ok or len(self.token_times) < 2 or num_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (num_tokens - 1)


def _lens(spec: str, flag: str = "--interactive-len") -> tuple[int, int]:
    try:
        a, b = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"{flag}: expected PROMPT,OUTPUT (two integers), got {spec!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{flag}: PROMPT and OUTPUT must be >= 1, got {spec!r}")
    return a, b


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ms(summary: dict[str, float], key: str) -> str:
    return f"{summary[key]:.0f}" if key in summary else "n/a"


def check_args(args: argparse.Namespace) -> None:
    """Fails on bad settings before any model or server starts."""
    for flag, value in (("--duration", args.duration), ("--load", args.load), ("--target-factor", args.target_factor)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value:g}")
    if not 0 <= args.interactive_share <= 1:
        raise ValueError(f"--interactive-share must be in [0, 1], got {args.interactive_share:g}")
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens",
                                                                args.max_num_batched_tokens),
                        ("--baseline-requests", args.baseline_requests),
                        ("--capacity-requests", args.capacity_requests)):
        check_at_least(flag, value)
    if args.threads is not None:
        check_at_least("--threads", args.threads)
    _lens(args.interactive_len, "--interactive-len")
    _lens(args.batch_len, "--batch-len")
    policies = _policies(args)
    bad = [p for p in policies if p not in ("fcfs", "priority", "slo")]
    if not policies or bad:
        raise ValueError(f"--policies: one or more of fcfs, priority, slo, got {args.policies!r}")


def _make(kind: str, lens: tuple[int, int], vocab: int, rng: random.Random) -> _Req:
    p, o = lens
    n = max(1, round(p * rng.uniform(0.75, 1.25)))
    return _Req(kind, [rng.randrange(3, vocab) for _ in range(n)], max(2, round(o * rng.uniform(0.75, 1.25))))


def _model_folder(args: argparse.Namespace, prefix: str = "tokenmill-slo-") -> str:
    """--model, or a random SmolLM-135M-shaped one made in a temporary folder (bench slo, bench disagg)."""
    from tokenmill.bench.prefix_cache import _prepare_model

    return _prepare_model(args.model or os.path.join(tempfile.mkdtemp(prefix=prefix), "model"))


def _policies(args: argparse.Namespace) -> list[str]:
    return [p.strip() for p in args.policies.split(",") if p.strip()]


async def _send(http, base: str, req: _Req, slo: dict[str, float] | None, t0: float) -> _Res:
    res = _Res()
    body: dict[str, Any] = {"model": "m", "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
                            "ignore_eos": True, "temperature": 0.0,
                            # the ids count each chunk's tokens: a slow reader's chunk may carry several
                            "return_token_ids": True}
    if slo is not None:
        body["slo"] = slo
    sent = time.perf_counter()
    try:
        async with http.stream("POST", base + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - sent
                    res.token_times.append(now - t0)
                    res.chunk_tokens.append(sum(len(c.get("token_ids") or ()) for c in chunk["choices"]))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.done_at = time.perf_counter() - t0
    return res


async def _baseline(base: str, reqs: list[_Req]) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        await _send(http, base, reqs[0], None, time.perf_counter())  # warm-up
        ttfts, tpots = [], []
        for r in reqs:
            t0 = time.perf_counter()
            res = await _send(http, base, r, None, t0)
            if not res.ok:
                raise RuntimeError(f"baseline request failed: {res.error}")
            ttfts.append(res.ttft)
            tp = res.tpot(r.max_tokens)
            if tp is not None:
                tpots.append(tp)
    return {"ttft_p50_ms": statistics.median(ttfts) * 1000, "tpot_p50_ms": statistics.median(tpots) * 1000,
            "ttft_ms": percentile_summary(ttfts, 1000), "tpot_ms": percentile_summary(tpots, 1000)}


async def _capacity(base: str, reqs: list[_Req]) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=3600) as http:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_send(http, base, r, None, t0) for r in reqs))
        span = time.perf_counter() - t0
    failed = [r.error for r in res if not r.ok]
    if failed:
        raise RuntimeError(f"capacity run: {len(failed)} failed: {failed[0]}")
    miscounted = [(x.tokens, r.max_tokens) for r, x in zip(reqs, res) if x.tokens != r.max_tokens]
    if miscounted:  # ignore_eos: every request streams exactly max_tokens
        raise RuntimeError(f"capacity run: {len(miscounted)} streamed a token count other than asked: {miscounted[0]}")
    return {"requests": len(reqs), "seconds": span, "requests_per_s": len(reqs) / span,
            "output_tokens_per_s": sum(r.tokens for r in res) / span}


async def _window(base: str, reqs: list[_Req], slo: dict[str, float], duration: float) -> list[tuple[_Req, _Res]]:
    """Sends each request at its arrival time; cancels what is still running at the end."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    results: dict[int, _Res] = {}
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        t0 = time.perf_counter()

        async def one(i: int, r: _Req) -> None:
            await asyncio.sleep(max(0.0, r.at - (time.perf_counter() - t0)))
            results[i] = await _send(http, base, r, slo if r.kind == "interactive" else None, t0)

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(reqs)]
        await asyncio.sleep(duration)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [(r, results.get(i, _Res())) for i, r in enumerate(reqs)]


def _server_slo(base: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith(("tokenmill:slo_", "tokenmill:goodput")):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def _summarize(pairs: list[tuple[_Req, _Res]], slo: dict[str, float], duration: float) -> dict[str, Any]:
    inter = [(r, x) for r, x in pairs if r.kind == "interactive" and r.at < 0.9 * duration]
    met = 0
    ttfts, tpots = [], []
    for r, x in inter:
        if x.ttft is not None:
            ttfts.append(x.ttft)
        tp = x.tpot(r.max_tokens)
        if x.ok and tp is not None:
            tpots.append(tp)
        if x.ok and x.ttft is not None and x.ttft * 1000 <= slo["ttft_ms"] and tp is not None \
                and tp * 1000 <= slo["tpot_ms"]:
            met += 1
    batch_tokens = sum(x.tokens_by(duration) for r, x in pairs if r.kind == "batch")
    errors = [x.error for _, x in pairs if x.error]
    errors += [f"{x.tokens} tokens streamed, {r.max_tokens} asked" for r, x in pairs
               if x.ok and x.tokens != r.max_tokens]
    return {
        "interactive_requests": len(inter), "interactive_met": met,
        "interactive_attainment": met / len(inter) if inter else None,
        "interactive_ttft_ms": percentile_summary(ttfts, 1000), "interactive_tpot_ms": percentile_summary(tpots, 1000),
        "batch_requests_sent": sum(1 for r, _ in pairs if r.kind == "batch"),
        "batch_requests_finished": sum(1 for r, x in pairs if r.kind == "batch" and x.ok),
        "batch_output_tokens_per_s": batch_tokens / duration,
        "errors": len(errors), "first_error": errors[0] if errors else None,
    }


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.bench.slo_sim import Workload, format_simulation, parse_step_model, simulate

    if args.step_model:
        coef = parse_step_model(args.step_model)
    else:
        import torch

        from tokenmill.config import EngineConfig
        from tokenmill.engine.llm_engine import LLMEngine

        if args.threads:
            torch.set_num_threads(args.threads)
        model = _model_folder(args)
        engine = LLMEngine(EngineConfig(model=model, scheduling_policy="slo", max_num_seqs=args.max_num_seqs,
                                        max_num_batched_tokens=args.max_num_batched_tokens))
        c = engine.step_model.coef
        coef = (float(c[0]) + engine.step_model.overhead_s, float(c[1]), float(c[2]), float(c[3]))
        del engine
    wl = Workload(_lens(args.interactive_len), _lens(args.batch_len, "--batch-len"), args.interactive_share)
    out = simulate(coef, wl, load=args.load, target_factor=args.target_factor, duration=args.duration,  # type: ignore[arg-type]
                   max_num_seqs=args.max_num_seqs, mnbt=args.max_num_batched_tokens,
                   capacity_requests=args.capacity_requests,
                   policies=tuple(_policies(args)), seed=args.seed)
    out["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))}
    print(format_simulation(out))
    write_json(args.json, out)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    if args.simulate:
        return _simulate(args)
    from tokenmill.bench.fleet import _Proc

    policies = _policies(args)
    model = _model_folder(args)
    with open(os.path.join(model, "config.json")) as f:
        vocab = int(json.load(f)["vocab_size"])
    logs = args.log_dir or tempfile.mkdtemp(prefix="tokenmill-slo-logs-")
    os.makedirs(logs, exist_ok=True)
    print(f"model {model}, logs in {logs}", flush=True)
    rng = random.Random(args.seed)
    ilen, blen = _lens(args.interactive_len), _lens(args.batch_len, "--batch-len")

    def serve(policy: str, tag: str) -> _Proc:
        cmd = ["serve", "--model", model, "--served-model-name", "m", "--scheduling-policy", policy,
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--seed", str(args.seed)]
        return _Proc(cmd, os.path.join(logs, f"{tag}.log"), args.threads).wait()

    flags = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))}
    out: dict[str, Any] = {"model": model, "cpu_count": os.cpu_count(), "args": flags}
    server = serve("fcfs", "baseline")
    try:
        out["baseline"] = asyncio.run(_baseline(server.url, [_make("interactive", ilen, vocab, rng)
                                                             for _ in range(args.baseline_requests)]))
        print(f"unloaded interactive: TTFT p50 {out['baseline']['ttft_p50_ms']:.0f} ms, TPOT p50 "
              f"{out['baseline']['tpot_p50_ms']:.1f} ms", flush=True)
        kinds = ["interactive" if rng.random() < args.interactive_share else "batch"
                 for _ in range(args.capacity_requests)]
        mix = [_make(k, ilen if k == "interactive" else blen, vocab, rng) for k in kinds]
        out["capacity"] = asyncio.run(_capacity(server.url, mix))
        print(f"capacity: {out['capacity']['requests_per_s']:.2f} requests/s "
              f"({out['capacity']['output_tokens_per_s']:.0f} output tokens/s)", flush=True)
    finally:
        server.stop()
    slo = {"ttft_ms": args.target_factor * out["baseline"]["ttft_p50_ms"],
           "tpot_ms": args.target_factor * out["baseline"]["tpot_p50_ms"]}
    rate = args.load * out["capacity"]["requests_per_s"]
    out["targets"] = slo
    out["offered_requests_per_s"] = rate
    # One arrival schedule and one set of requests for every policy.
    t, reqs = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= args.duration:
            break
        kind = "interactive" if rng.random() < args.interactive_share else "batch"
        r = _make(kind, ilen if kind == "interactive" else blen, vocab, rng)
        r.at = t
        reqs.append(r)
    out["requests"] = len(reqs)
    print(f"targets TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.1f} ms; offered {rate:.2f} requests/s "
          f"({len(reqs)} in {args.duration:.0f} s)", flush=True)
    for policy in policies:
        server = serve(policy, policy)
        try:
            pairs = asyncio.run(_window(server.url, reqs, slo, args.duration))
            out[policy] = _summarize(pairs, slo, args.duration)
            time.sleep(1.0)  # cancelled streams are aborted on the server
            out[policy]["server_counters"] = _server_slo(server.url)
        finally:
            server.stop()
        s = out[policy]
        print(f"{policy}: interactive attainment {_pct(s['interactive_attainment'])} "
              f"({s['interactive_met']}/{s['interactive_requests']}), batch {s['batch_output_tokens_per_s']:.1f} "
              f"tokens/s", flush=True)
        write_json(args.json, out)
    if "fcfs" in out and "slo" in out:
        out["batch_throughput_loss"] = 1 - out["slo"]["batch_output_tokens_per_s"] / max(
            out["fcfs"]["batch_output_tokens_per_s"], 1e-9)
    print(format_report(out))
    write_json(args.json, out)
    return out


def format_report(out: dict[str, Any]) -> str:
    pols = [p for p in ("fcfs", "priority", "slo") if p in out]
    lines = [f"offered load {out['offered_requests_per_s']:.2f} requests/s "
             f"({out['args']['load']:g}x the measured capacity of {out['capacity']['requests_per_s']:.2f}); targets "
             f"TTFT {out['targets']['ttft_ms']:.0f} ms, TPOT {out['targets']['tpot_ms']:.1f} ms "
             f"({out['args']['target_factor']:g}x the unloaded p50s)",
             f"  {'':<34}" + "".join(f"{p:>12}" for p in pols)]

    def row(label: str, fn) -> None:
        lines.append(f"  {label:<34}" + "".join(f"{fn(out[p]):>12}" for p in pols))

    row("interactive attainment", lambda s: _pct(s["interactive_attainment"]))
    row("interactive TTFT p50 / p99 (ms)", lambda s: f"{_ms(s['interactive_ttft_ms'], 'p50')}/"
        f"{_ms(s['interactive_ttft_ms'], 'p99')}")
    row("interactive TPOT p50 / p99 (ms)", lambda s: f"{_ms(s['interactive_tpot_ms'], 'p50')}/"
        f"{_ms(s['interactive_tpot_ms'], 'p99')}")
    row("batch output tokens/s", lambda s: f"{s['batch_output_tokens_per_s']:.1f}")
    row("batch requests finished", lambda s: f"{s['batch_requests_finished']}/{s['batch_requests_sent']}")
    if "batch_throughput_loss" in out:
        lines.append(f"  batch throughput loss with slo: {out['batch_throughput_loss']:.1%}")
    return "\n".join(lines)
