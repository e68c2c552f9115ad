"""`tokenmill bench disagg`: fleet layouts with and without prefill workers, predicted and measured.

1. The step-time model is measured on this machine (LLMEngine.calibrate, with each worker's
   threads), and the KV transfer model on a real prefill worker and decode replica: a prefill, its
   export and its import, timed for a short and a long prompt (the fixed cost and the bandwidth).
2. The simulator (bench/disagg_sim.py) predicts each layout's latencies, SLO attainment and
   goodput for the workload: Poisson arrivals of long prompts and shorter answers.
3. Unless --simulate, each layout in --measure runs the same requests (same lengths, same
   arrival times) on real servers behind `tokenmill router` (colocated replicas, or prefill workers
   and decode replicas), streamed, and its measured figures are printed beside the prediction.

Latency targets default to factors of one request's unloaded latencies in the simulator
(--ttft-factor, --tpot-factor); --ttft-ms and --tpot-ms set them outright.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import tempfile
import time
from typing import Any

from tokenmill.bench import check_at_least, check_json_path, write_json
from tokenmill.bench.disagg_sim import Layout, SimWorkload, TransferModel, simulate_fleet, summarize
from tokenmill.bench.fleet import _Proc, _wait_synced
from tokenmill.bench.slo import _model_folder
from tokenmill.bench.slo_sim import parse_step_model
from tokenmill.engine.slo import SLOTarget
from tokenmill.router.disagg import DisaggConfig

SERVED = "bench"
KV_KEY = secrets.token_urlsafe(24)  # the servers' --kv-transfer-key, the router's too


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the demo model)")
    p.add_argument("--layouts", default="2,1p1d,1p1d:always",
                   help="layouts to simulate: N colocated replicas, or PpDd[:auto|always] (default 2,1p1d,1p1d:always)")
    p.add_argument("--measure", default="2,1p1d", help="layouts also run on real servers ('' for none)")
    p.add_argument("--simulate", action="store_true", help="predict only (no servers; the transfer model from "
                   "--transfer-latency-ms and --transfer-mbps)")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ttft-factor", type=float, default=4.0, help="TTFT target: this times the unloaded TTFT")
    p.add_argument("--tpot-factor", type=float, default=1.5, help="TPOT target: this times the unloaded TPOT")
    p.add_argument("--ttft-ms", type=float, default=None)
    p.add_argument("--tpot-ms", type=float, default=None)
    p.add_argument("--disagg-min-tokens", type=int, default=DisaggConfig.min_tokens,
                   help="the router's --disagg-min-tokens (and the simulator's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory", type=float, default=0.25, metavar="GIB", help="per worker")
    p.add_argument("--step-model", default=None, metavar="S,T,R,A",
                   help="the step-time model's coefficients instead of calibrating (as bench slo --simulate)")
    p.add_argument("--transfer-latency-ms", type=float, default=None)
    p.add_argument("--transfer-mbps", type=float, default=None, help="KV transfer bandwidth, MB/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None)


def check_args(args: argparse.Namespace) -> tuple[list[Layout], list[Layout]]:
    for flag in ("rate", "duration", "ttft_factor", "tpot_factor", "kv_cache_memory"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')}: must be > 0")
    check_at_least("--disagg-min-tokens", args.disagg_min_tokens, 0)
    for flag in ("prompt_len", "output_len", "threads", "max_num_seqs", "max_num_batched_tokens"):
        check_at_least("--" + flag.replace("_", "-"), getattr(args, flag), 2 if flag == "output_len" else 1)
    for flag in ("ttft_ms", "tpot_ms", "transfer_latency_ms", "transfer_mbps"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            raise ValueError(f"--{flag.replace('_', '-')}: must be > 0")
    if (args.transfer_latency_ms is None) != (args.transfer_mbps is None):
        raise ValueError("--transfer-latency-ms and --transfer-mbps: give both (the transfer model) or neither "
                         "(measured)")
    layouts = [Layout.parse(x) for x in args.layouts.split(",") if x.strip()]
    measure = [Layout.parse(x) for x in args.measure.split(",") if x.strip()] if not args.simulate else []
    if not layouts and not measure:
        raise ValueError("--layouts: give at least one layout")
    for lay in layouts + measure:
        if lay.decode < 1 or lay.prefill < 0:
            raise ValueError(f"layout {lay.name}: at least one decode worker")
    check_json_path(args.json)
    for lay in measure:  # measured layouts are predicted too
        if lay not in layouts:
            layouts.append(lay)
    return layouts, measure


def _coef(args: argparse.Namespace, model: str) -> tuple[float, float, float, float]:
    if args.step_model:
        return parse_step_model(args.step_model)
    import torch

    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # as each worker runs
    try:
        engine = LLMEngine(EngineConfig(model=model, scheduling_policy="slo", max_num_seqs=args.max_num_seqs,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        kv_cache_memory_bytes=int(args.kv_cache_memory * 2**30)))
        engine.calibrate(budget_s=10.0)
        c = engine.step_model.coef
        coef = (float(c[0]) + engine.step_model.overhead_s, float(c[1]), float(c[2]), float(c[3]))
        kv_per_token = engine.runner.kv_bytes_per_block // engine.config.block_size
        args._kv_bytes_per_token = kv_per_token
        # The import's work on the engine thread: a payload's blocks written into the cache.
        from tokenmill.engine.kv_transfer import gather, scatter

        blocks = list(range(min(64, engine.block_manager.num_blocks)))
        kv = gather(engine.runner.kv_caches, blocks)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            scatter(engine.runner.kv_caches, blocks, kv)
            best = min(best, time.perf_counter() - t0)
        args._import_bytes_per_s = kv.numel() * kv.element_size() / max(best, 1e-9)
        del engine
    finally:
        torch.set_num_threads(threads)
    return coef


def _kv_per_token(args: argparse.Namespace, model: str) -> int:
    v = getattr(args, "_kv_bytes_per_token", None)
    if v is None:
        import torch

        from tokenmill.config import EngineConfig, ModelConfig

        mc = ModelConfig.from_pretrained(model)
        dtype = EngineConfig(model=model).resolve_dtype(mc, torch.device("cpu"))
        v = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * torch.finfo(dtype).bits // 8
    return v


def _server(model: str, args: argparse.Namespace, log: str) -> _Proc:
    return _Proc(["serve", "--model", model, "--served-model-name", SERVED, "--seed", str(args.seed), "--kv-transfer",
                  "--kv-transfer-key", KV_KEY,
                  "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
                  str(args.max_num_batched_tokens), "--kv-cache-memory", f"{args.kv_cache_memory:g}"],
                 log, args.threads)


def _vocab(model: str) -> int:
    from tokenmill.config import ModelConfig

    return ModelConfig.from_pretrained(model).vocab_size


def _prompt(rid: str, n: int, vocab: int) -> list[int]:
    rng = random.Random(rid)  # distinct prompts: nothing shared between requests
    return [rng.randrange(3, vocab) for _ in range(n)]


async def _measure_transfer(prefill: str, decode: str, vocab: int, lengths: tuple[int, int]) -> dict[str, float]:
    """A prefill on the worker, then its KV pulled by the replica (the router's default transfer),
    timed (not the prefill) for a short and a long prompt, three times each: the transfer's fixed
    cost and bandwidth."""
    import httpx

    times: dict[int, float] = {}
    nbytes: dict[int, int] = {}
    auth = {"authorization": f"Bearer {KV_KEY}"}
    async with httpx.AsyncClient(timeout=600) as http:
        for n in lengths:
            best = float("inf")
            for k in range(3):
                body = {"model": SERVED, "prompt": _prompt(f"transfer-{n}-{k}", n, vocab), "max_tokens": 1,
                        "kv_transfer_params": {"do_remote_decode": True}}
                r = await http.post(prefill + "/v1/completions", json=body,
                                    headers={"x-tokenmill-kv-transfer-key": KV_KEY})
                r.raise_for_status()
                tid = r.json()["kv_transfer_params"]["transfer_id"]
                t0 = time.perf_counter()
                imp = await http.post(decode + "/v1/kv_transfer", params={"model": SERVED}, headers=auth,
                                      json={"source": prefill, "transfer_id": tid})
                imp.raise_for_status()
                best = min(best, time.perf_counter() - t0)
                nbytes[n] = imp.json()["bytes"]
            times[n] = best
    short, long_ = lengths
    bw = (nbytes[long_] - nbytes[short]) / max(1e-9, times[long_] - times[short])
    latency = max(0.0, times[short] - nbytes[short] / bw) if bw > 0 else times[short]
    return {"latency_s": latency, "bytes_per_s": bw if bw > 0 else float("inf"),
            "short": {"tokens": short, "bytes": nbytes[short], "seconds": times[short]},
            "long": {"tokens": long_, "bytes": nbytes[long_], "seconds": times[long_]}}


async def _send(http: Any, base: str, rid: str, ids: list[int], out: int, at: float, t0: float
                ) -> tuple[str, float | None, float | None, str]:
    import json

    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    start = t0 + at  # latencies from the scheduled arrival (an open-loop client late to send counts)
    body = {"model": SERVED, "prompt": ids, "max_tokens": out, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    first = last = None
    n = 0
    try:
        async with http.stream("POST", base + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return rid, None, None, f"HTTP {resp.status_code}"
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return rid, None, None, f"stream error: {chunk['error']}"
                if chunk.get("usage"):
                    n = int(chunk["usage"].get("completion_tokens") or 0)
                if chunk.get("choices"):
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
    except Exception as e:  # a failed request meets no target
        return rid, None, None, f"{type(e).__name__}: {e}"
    if first is None or last is None or n < out:  # (a stream that ended early met no target)
        return rid, None, None, f"{n} of {out} tokens"
    return rid, first - start, (last - first) / max(1, out - 1), ""


async def _warm_up(base: str, vocab: int) -> None:
    """Kernels and first allocations, outside the window: a request through each path."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        for k in range(2):
            await _send(http, base, f"warm{k}", _prompt(f"warm{k}", 300, vocab), 4, 0.0, time.perf_counter())


async def _run_load(base: str, reqs: list[tuple[str, int, int, float]], vocab: int) -> tuple[dict, dict, list[str]]:
    import httpx

    prompts = {rid: _prompt(rid, p, vocab) for rid, p, _, _ in reqs}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as http:
        t0 = time.perf_counter() + 0.05
        results = await asyncio.gather(*(_send(http, base, rid, prompts[rid], o, at, t0) for rid, _, o, at in reqs))
    ttft = {rid: a for rid, a, _, _ in results if a is not None}
    tpot = {rid: b for rid, _, b, _ in results if b is not None}
    return ttft, tpot, [e for *_, e in results if e]


def _num_blocks(args: argparse.Namespace, kv_per_token: int) -> int:
    """A worker's KV cache in blocks as --kv-cache-memory sizes it (the simulator's workers get as many;
    the runner's own cap, max_num_seqs full-length sequences, is far above it here)."""
    return max(1, int(args.kv_cache_memory * 2**30) // (kv_per_token * 16))


def _measure(model: str, args: argparse.Namespace, lay: Layout, reqs: list, vocab: int, slo: SLOTarget,
             logs: str) -> dict[str, Any]:
    procs: list[_Proc] = []
    decoders: list[_Proc] = []
    prefills: list[_Proc] = []
    try:
        for role, n, into in (("decode", lay.decode, decoders), ("prefill", lay.prefill, prefills)):
            for i in range(n):
                into.append(_server(model, args, os.path.join(logs, f"{lay.prefill}p{lay.decode}d-{role}{i}.log")))
                procs.append(into[-1])
        for p in procs:
            p.wait()
        cmd = ["router", "--tokenizer", model, "--health-interval", "0.5", "--disagg-policy", lay.policy,
               "--disagg-min-tokens", str(args.disagg_min_tokens), "--kv-transfer-key", KV_KEY]
        for p in decoders:
            cmd += ["--replica", p.url]
        for p in prefills:
            cmd += ["--prefill", p.url]
        router = _Proc(cmd, os.path.join(logs, f"{lay.prefill}p{lay.decode}d-router.log"))
        procs.append(router)
        router.wait()
        _wait_synced(router, len(decoders) + len(prefills))
        import httpx

        asyncio.run(_warm_up(router.url, vocab))
        before = httpx.get(router.url + "/metrics", timeout=10).text
        ttft, tpot, errors = asyncio.run(_run_load(router.url, reqs, vocab))
        out = summarize(lay.name, reqs, ttft, tpot, slo, args.duration)
        after = httpx.get(router.url + "/metrics", timeout=10).text

        def metric(prefix: str, label: str = "") -> float:  # (the window's: after its start)
            def total(text: str) -> float:
                return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                           if ln.startswith(prefix) and label in ln)
            return total(after) - total(before)

        out["remote_prefills"] = int(metric("tokenmill_router:prefill_decisions_total{", 'where="remote"'))
        out["transfers"] = int(metric("tokenmill_router:kv_transfer_seconds_count"))  # (the ones that landed)
        out["transfer_failures"] = int(metric("tokenmill_router:kv_transfer_failures_total"))
        out["errors"] = len(errors)
        out["first_error"] = errors[0] if errors else None
        # What the run measured: each worker's step-time model fitted on its own steps, and the transfers.
        coefs = []
        for p in decoders + prefills:
            card = httpx.get(p.url + "/v1/models", timeout=10).json()["data"][0]
            m = card.get("step_time_model") or {}
            coefs.append((m["step_s"] + m["overhead_s"], m["per_token_s"], m["per_row_s"], m["per_attention_ktoken_s"])
                         if m.get("steps_observed") else None)  # (a worker that stepped nothing: none fitted)
        n = metric("tokenmill_router:kv_transfer_seconds_count")
        secs = metric("tokenmill_router:kv_transfer_seconds_sum")
        out["in_situ"] = {"step_models": coefs, "transfers": int(n),
                          "transfer_bytes_per_s": metric("tokenmill_router:kv_transfer_bytes_total") / secs
                          if n and secs > 0 else None}
        return out
    finally:
        for p in reversed(procs):
            p.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    layouts, measure = check_args(args)
    model = _model_folder(args, "tokenmill-disagg-")
    logs = args.log_dir or tempfile.mkdtemp(prefix="tokenmill-bench-disagg-")
    os.makedirs(logs, exist_ok=True)
    coef = _coef(args, model)
    kv_per_token = _kv_per_token(args, model)
    vocab = _vocab(model)
    out: dict[str, Any] = {"model": model, "step_model": list(coef), "kv_bytes_per_token": kv_per_token}
    if args.transfer_mbps is not None or not measure:
        latency = (args.transfer_latency_ms or 5.0) / 1000
        bw = (args.transfer_mbps or 1000.0) * 1e6
        out["transfer"] = {"latency_s": latency, "bytes_per_s": bw, "source": "flags"}
    else:
        pair = [_server(model, args, os.path.join(logs, f"transfer-{r}.log")) for r in ("prefill", "decode")]
        try:
            for p in pair:
                p.wait()
            out["transfer"] = asyncio.run(_measure_transfer(pair[0].url, pair[1].url, vocab,
                                                            (64, max(1024, args.prompt_len))))
            out["transfer"]["source"] = "measured"
        finally:
            for p in pair:
                p.stop()
    out["transfer"]["import_bytes_per_s"] = getattr(args, "_import_bytes_per_s", float("inf"))
    transfer = TransferModel(out["transfer"]["latency_s"], out["transfer"]["bytes_per_s"], kv_per_token,
                             out["transfer"]["import_bytes_per_s"])
    kw = {"max_num_seqs": args.max_num_seqs, "mnbt": args.max_num_batched_tokens,
          "num_blocks": _num_blocks(args, kv_per_token)}
    # One request alone: the unloaded latencies the targets are factors of.
    wl = SimWorkload(args.prompt_len, args.output_len, args.rate, args.duration, seed=args.seed)
    alone = simulate_fleet(coef, Layout(1), wl, SLOTarget(), transfer,
                           requests=[("alone", args.prompt_len, args.output_len, 0.0)], **kw)
    base_ttft, base_tpot = alone["ttft_ms"]["p50"], alone["tpot_ms"]["p50"]
    slo = SLOTarget((args.ttft_ms or args.ttft_factor * base_ttft) / 1000,
                    (args.tpot_ms or args.tpot_factor * base_tpot) / 1000)
    out["unloaded"] = {"ttft_ms": base_ttft, "tpot_ms": base_tpot}
    out["targets"] = slo.to_dict()
    reqs = wl.requests()
    out["workload"] = {"rate": args.rate, "duration": args.duration, "requests": len(reqs),
                       "prompt_len": args.prompt_len, "output_len": args.output_len}
    out["predicted"] = [simulate_fleet(coef, lay, wl, slo, transfer, disagg=DisaggConfig(
        lay.policy, args.disagg_min_tokens), **kw) for lay in layouts]
    print(format_prediction(out))
    out["measured"], out["predicted_in_situ"] = [], []
    for lay in measure:
        got = _measure(model, args, lay, reqs, vocab, slo, logs)
        out["measured"].append(got)
        print(format_layout_line("measured", got))
        # The same prediction from the step times and transfers this run measured (the simulator's own
        # error, apart from the calibration's).
        bw = got["in_situ"]["transfer_bytes_per_s"]
        situ = TransferModel(0.0, bw, kv_per_token, transfer.import_bytes_per_s) if bw else transfer
        again = simulate_fleet(coef, lay, wl, slo, situ, coefs=[c or coef for c in got["in_situ"]["step_models"]],
                               disagg=DisaggConfig(lay.policy, args.disagg_min_tokens), **kw)
        out["predicted_in_situ"].append(again)
        print(format_layout_line("in situ", again))
    if out["measured"]:
        print(format_comparison(out))
    out["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_") and
                   isinstance(v, (int, float, str, type(None)))}
    write_json(args.json, out)
    return out


def format_layout_line(kind: str, s: dict[str, Any]) -> str:
    def p(d: dict, k: str, fmt: str = ".0f") -> str:
        return format(d[k], fmt) if k in d else "n/a"

    att = _pct(s["attainment"])
    return (f"  {kind:<9} {s['layout']:<22} attainment {att:>6}  goodput {s['goodput_rps']:.2f} req/s  "
            f"TTFT p50/p90 {p(s['ttft_ms'], 'p50')}/{p(s['ttft_ms'], 'p90')} ms  "
            f"TPOT p50/p90 {p(s['tpot_ms'], 'p50', '.1f')}/{p(s['tpot_ms'], 'p90', '.1f')} ms  "
            f"remote prefills {s.get('remote_prefills') or 0}/{s['requests']}"
            + (f" (KV moved {s['transfers']}, fell back {s['transfer_failures']})" if "transfers" in s else ""))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def format_prediction(out: dict[str, Any]) -> str:
    c, t = out["step_model"], out["transfer"]
    lines = [f"step-time model: {1000 * c[0]:.2f} ms a step, {1000 * c[1]:.4f} ms a token, {1000 * c[2]:.3f} ms a "
             f"sampled row, {1000 * c[3]:.5f} ms per 1k attention pairs",
             f"KV transfer ({t['source']}): {1000 * t['latency_s']:.1f} ms + {t['bytes_per_s'] / 1e6:.0f} MB/s "
             f"({out['kv_bytes_per_token']} bytes a token); its import stalls the decode worker "
             f"{t['import_bytes_per_s'] / 1e6:.0f} MB/s",
             f"unloaded: TTFT {out['unloaded']['ttft_ms']:.0f} ms, TPOT {out['unloaded']['tpot_ms']:.1f} ms; targets "
             f"TTFT {out['targets']['ttft_ms']:.0f} ms, TPOT {out['targets']['tpot_ms']:.1f} ms",
             f"workload: {out['workload']['requests']} requests at {out['workload']['rate']:g}/s, prompts "
             f"{out['workload']['prompt_len']} +-25%, outputs {out['workload']['output_len']} +-25%"]
    lines += [format_layout_line("predicted", s) for s in out["predicted"]]
    return "\n".join(lines)


def format_comparison(out: dict[str, Any]) -> str:
    pred = {s["layout"]: s for s in out["predicted"]}
    situ = {s["layout"]: s for s in out.get("predicted_in_situ", [])}
    lines = ["measured vs predicted (calibrated alone; in situ: from the run's own step times and transfers):"]
    for m in out["measured"]:
        for kind, p in (("predicted", pred.get(m["layout"])), ("in situ", situ.get(m["layout"]))):
            if p is None:
                continue
            ratio = m["goodput_rps"] / p["goodput_rps"] if p["goodput_rps"] else float("nan")
            lines.append(f"  {m['layout']:<22} goodput {m['goodput_rps']:.2f} vs {kind} {p['goodput_rps']:.2f} req/s "
                         f"(ratio {ratio:.2f}), attainment {_pct(m['attainment'])} vs {_pct(p['attainment'])}")
    best_m = max(out["measured"], key=lambda s: s["goodput_rps"])
    best_p = max((pred[m["layout"]] for m in out["measured"] if m["layout"] in pred), key=lambda s: s["goodput_rps"])
    lines.append(f"  best layout: measured {best_m['layout']}, predicted {best_p['layout']}")
    return "\n".join(lines)
