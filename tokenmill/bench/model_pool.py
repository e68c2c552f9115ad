"""`tokenmill bench model-pool`: the model pool's figures (issue 13), each measured in one run.

- swap: two demo-family models (the demo model and the reasoning model) in one `tokenmill serve`
  whose --memory-budget holds one at a time, streams to both at once for --seconds. Every swap
  (parking the model that goes, bringing back the one that comes, from the server's log), the
  requests' waits, and the throughput. Then a larger random model dropped to disk and loaded
  back through the admin routes: its load speed beside `dd`'s read of the same files.
- cascade: the reasoning demo model (strong) and its small sibling on held-out chain questions.
  Both answer every question once (greedy, with token logprobs); the cascade's decision is
  replayed over thresholds on the validation split (the accuracy-vs-cost curve, costs in FLOPs
  and in engine-seconds), the threshold that keeps accuracy within a point of strong-only at the
  lowest FLOPs is chosen there and applied to the test split. Then the same tier is served and
  the test split sent through it: accuracy, the share escalated, and the time against sending
  the same questions to the strong model through the same server.
- mixed: three models in one server, Poisson arrivals split between them; each model's output
  tokens/s and latency against a server with that model alone, sent the same requests at the
  same times (its share of the arrivals).
- park (not in the default parts): one model's park and unpark, timed in process, with a
  request running across each (its output checked against an undisturbed run): the GPU figure,
  `--parts park --model DIR --device cuda`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import time
from typing import Any

from tokenmill.bench import running_server, write_json
from tokenmill.stats import percentile_summary

PARTS = ("swap", "cascade", "mixed", "park")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="swap,cascade,mixed", help=f"which parts to run, of {','.join(PARTS)}")
    p.add_argument("--seconds", type=float, default=30.0, help="swap: how long both models are under load")
    p.add_argument("--streams", type=int, default=4, help="swap: concurrent streams per model")
    p.add_argument("--kv-cache-memory", type=float, default=0.25, metavar="GIB",
                   help="swap and mixed: each model's KV cache")
    p.add_argument("--swap-quantum", type=float, default=0.5, help="swap: the server's --swap-quantum")
    p.add_argument("--disk-params", type=float, default=250e6,
                   help="swap: parameters of the random model loaded from disk (float32 on disk)")
    p.add_argument("--questions", type=int, default=600, help="cascade: questions per split")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--rate", type=float, default=20.0, help="mixed: requests/s over the three models together")
    p.add_argument("--requests", type=int, default=150, help="mixed: requests in all")
    p.add_argument("--model", default=None, help="park: the model folder (e.g. a 0.5-1B model on a GPU)")
    p.add_argument("--device", default="auto", help="park: cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", help="park: the model's dtype")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--plot", default=None, help="cascade: write the accuracy-vs-cost plot to this PNG")


def _demo(name: str) -> str:
    import tokenmill

    root = os.path.dirname(tokenmill.__file__)
    return os.path.join(root, "demo_model") if name == "demo" else os.path.join(root, "demo_models", name)


def _server(args: list[str], log_path: str) -> contextlib.AbstractContextManager[str]:
    from tokenmill.server.serve import free_port

    port = free_port()
    return running_server(["serve", "--host", "127.0.0.1", "--port", str(port), *args], port, log_path,
                          lambda: f":\n{open(log_path, errors='replace').read()[-3000:]}")


def _yaml(path: str, doc: dict) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


# -- swap --------------------------------------------------------------------------------------------
def run_swap(args: argparse.Namespace, work: str) -> dict[str, Any]:
    from tokenmill.demo import chain_questions

    models = {"demo": _demo("demo"), "chain": _demo("chain")}
    kv = args.kv_cache_memory
    doc = {"memory_budget": kv * 1.5, "swap_quantum": args.swap_quantum,
           "models": [{"name": n, "path": p, "kv_cache_memory": kv} for n, p in models.items()]}
    qs = chain_questions(64, split=0)
    out: dict[str, Any] = {"kv_cache_gib": kv, "memory_budget_gib": kv * 1.5, "swap_quantum_s": args.swap_quantum}
    for budget, label in ((kv * 1.5, "under_load"), (kv * 3, "no_swaps")):
        doc["memory_budget"] = budget
        log = os.path.join(work, f"swap_{label}.log")
        with _server(["--models", _yaml(os.path.join(work, f"swap_{label}.yaml"), doc)], log) as base:
            elapsed, tokens, waits, errors = asyncio.run(_two_model_load(base, list(models), qs, args))
        text = open(log, errors="replace").read()
        swaps = [float(ms) for ms in re.findall(r"active \(from parked in ([\d.]+) ms\)", text)]
        parks = [int(n) for n in re.findall(r"parked in [\d.]+ ms \((\d+) sequences preempted", text)]
        total = sum(tokens.values()) / elapsed
        out[label] = {"memory_budget_gib": budget, "seconds": round(elapsed, 1), "swaps": len(swaps),
                      "swap_ms": percentile_summary(swaps), "sequences_preempted_per_park":
                          percentile_summary([float(p) for p in parks]),
                      "request_wait_s": percentile_summary(waits), "output_tokens_per_s": {
                          n: round(t / elapsed, 1) for n, t in tokens.items()}, "total_tokens_per_s": round(total, 1),
                      "errors": len(errors)}
        if label == "under_load":
            sw = percentile_summary(swaps)
            print(f"swap under load: {len(swaps)} swaps in {elapsed:.0f}s, swap time p50 {sw.get('p50', 0):.2f} ms, "
                  f"p99 {sw.get('p99', 0):.2f} ms, max {sw.get('max', 0):.2f} ms (goal: <= 50 ms); requests "
                  f"that waited: {len(waits)}, wait p50 {percentile_summary(waits).get('p50', 0) * 1000:.0f} ms; "
                  f"{total:.0f} output tokens/s", flush=True)
        else:
            ratio = out["under_load"]["total_tokens_per_s"] / total
            out["throughput_with_swaps_vs_without"] = round(ratio, 3)
            print(f"the same load with both models active (no swaps): {total:.0f} output tokens/s; with swaps "
                  f"{ratio:.0%} of that", flush=True)
    out["from_disk"] = _disk_load(args, work)
    return out


async def _two_model_load(base: str, models: list[str], qs: list, args: argparse.Namespace
                          ) -> tuple[float, dict[str, int], list[float], list[str]]:
    """--streams closed-loop clients per model for --seconds: (seconds, output tokens per model,
    the swap waits the responses reported, errors)."""
    import httpx

    from tokenmill.demo import chain_question

    waits: list[float] = []
    tokens = {n: 0 for n in models}
    errors: list[str] = []

    async def client(name: str, k: int, stop: float) -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            i = k
            while time.perf_counter() < stop:
                nums, ops = qs[i % len(qs)]
                body = {"model": name, "max_tokens": 96, "temperature": 0,
                        "messages": [{"role": "user", "content": chain_question(nums, ops)}]}
                r = await http.post(base + "/v1/chat/completions", json=body)
                i += args.streams
                if r.status_code != 200:
                    errors.append(r.text[:200])
                    continue
                d = r.json()
                tokens[name] += d["usage"]["completion_tokens"]
                if d.get("swap"):
                    waits.append(d["swap"]["wait_s"])

    t0 = time.perf_counter()
    stop = t0 + args.seconds
    await asyncio.gather(*(client(n, k, stop) for n in models for k in range(args.streams)))
    return time.perf_counter() - t0, tokens, waits, errors


def _random_model(path: str, params: float) -> str:
    """A random Llama of about `params` parameters saved in float32 (no download)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden = 1024
    layers = max(1, round((params - 2 * 32000 * hidden) / (12 * hidden * hidden)))
    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                               num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                               max_position_embeddings=2048, torch_dtype="float32")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _dd_gbps(files: list[str]) -> float:
    total, seconds = 0, 0.0
    for f in files:
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
        seconds += time.perf_counter() - t0
        total += os.path.getsize(f)
    return total / seconds / 1e9


def _first_touch_gbps(nbytes: int) -> float:
    """How fast this machine hands out memory never touched before (a huge-page region, as the
    weights get): on a VM each first touch may be a fault in the hypervisor too."""
    from tokenmill.memory import host_arena

    t0 = time.perf_counter()
    arena = host_arena(nbytes)
    arena.zero_()
    seconds = time.perf_counter() - t0
    del arena
    return nbytes / seconds / 1e9


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _disk_load(args: argparse.Namespace, work: str) -> dict[str, Any]:
    import glob

    import httpx

    path = _random_model(os.path.join(work, "disk_model"), args.disk_params)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    nbytes = sum(os.path.getsize(f) for f in files)
    doc = {"models": [{"name": "demo", "path": _demo("demo"), "kv_cache_memory": 0.0625},
                      {"name": "big", "path": path, "kv_cache_memory": 0.25, "max_model_len": 512,
                       "prepack_weights": False}]}
    out: dict[str, Any] = {"checkpoint_bytes": nbytes}
    with _server(["--models", _yaml(os.path.join(work, "disk.yaml"), doc)], os.path.join(work, "disk.log")) as base:
        # Twice each: the first load in the process also pays for memory the VM never handed out
        # before (see fresh_memory_gb_per_s); later ones reuse what the dropped model gave back.
        for cache in ("warm", "cold", "warm", "cold"):
            r = httpx.post(f"{base}/v1/models/big/unload", json={"to": "disk"}, timeout=60)
            r.raise_for_status()
            if cache == "cold" and not _drop_caches():
                out["cold"] = "not measured: dropping the page cache needs root"
                continue
            dd = _dd_gbps(files)
            if cache == "cold":  # dd just read them into the page cache: drop it again for the load
                _drop_caches()
            r = httpx.post(f"{base}/v1/models/big/load", timeout=600)
            r.raise_for_status()
            s = r.json()["swap"]["wait_s"]
            out.setdefault(cache, []).append({"load_s": round(s, 3), "load_gb_per_s": round(nbytes / s / 1e9, 2),
                                              "dd_gb_per_s": round(dd, 2)})
            print(f"load from disk ({cache} page cache): {nbytes / 1e9:.2f} GB in {s:.2f}s = "
                  f"{nbytes / s / 1e9:.2f} GB/s; dd reads the files at {dd:.2f} GB/s", flush=True)
    touch = _first_touch_gbps(nbytes)  # in this process, which has not held that much memory yet
    out["fresh_memory_gb_per_s"] = round(touch, 2)
    print(f"memory never touched before is handed out at {touch:.2f} GB/s here (the weights need "
          f"{nbytes / 1e9:.2f} GB of it)", flush=True)
    return out


# -- cascade -----------------------------------------------------------------------------------------
def _param_count(path: str) -> tuple[int, int, int, int]:
    """(parameters the per-token matmuls use, layers, hidden size, context) of a checkpoint."""
    from tokenmill.config import ModelConfig

    mc = ModelConfig.from_pretrained(path)
    h, i, layers = mc.hidden_size, mc.intermediate_size, mc.num_layers
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    return layers * per_layer + mc.vocab_size * h, layers, h, mc.max_context


def _flops(path: str, prompt: int, generated: int) -> float:
    """Forward FLOPs of a prompt and `generated` tokens: 2 per weight per token, plus attention's
    4 * layers * q_width per earlier position."""
    matmul, layers, h, _ = _param_count(path)
    n = prompt + generated
    return 2.0 * matmul * n + 4.0 * layers * h * n * (n - 1) / 2


def _answers(path: str, prompts: list[str], max_tokens: int) -> tuple[list[Any], float]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(path, dtype="float32", seed=0)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))  # warm-up, untimed
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0))
    return outs, time.perf_counter() - t0


def run_cascade(args: argparse.Namespace, work: str) -> dict[str, Any]:
    from tokenmill.demo import chain_question, chain_questions, chain_value, parse_answer
    from tokenmill.engine.llm_engine import load_tokenizer
    from tokenmill.routing import CascadeMonitor, CascadePolicy

    small_path, strong_path = _demo("chain_small"), _demo("chain")
    tok = load_tokenizer(strong_path)
    data: dict[str, Any] = {}
    secs_per_token: dict[str, float] = {}
    for split, label in ((1, "validation"), (0, "test")):
        qs = chain_questions(args.questions, split=split)
        prompts = [tok.apply_chat_template([{"role": "user", "content": chain_question(n, o)}],
                                           add_generation_prompt=True, tokenize=False) for n, o in qs]
        per = {}
        for name, path in (("small", small_path), ("strong", strong_path)):
            outs, seconds = _answers(path, prompts, args.max_tokens)
            rows = []
            for (nums, ops), o in zip(qs, outs):
                c = o.outputs[0]
                rows.append({"correct": parse_answer(c.text) == chain_value(nums, ops),
                             "logprobs": [e[t].logprob for e, t in zip(c.logprobs, c.token_ids)],
                             "prompt": len(o.prompt_token_ids)})
            per[name] = rows
            gen = sum(len(r["logprobs"]) + r["prompt"] for r in rows)
            secs_per_token.setdefault(name, seconds / gen)
            print(f"cascade {label}: {name} greedy accuracy {sum(r['correct'] for r in rows) / len(rows):.1%} "
                  f"({seconds:.0f}s)", flush=True)
        data[label] = (qs, per)

    def replay(label: str, policy: CascadePolicy) -> dict[str, Any]:
        _, per = data[label]
        correct = escalated = 0
        flops = secs = 0.0
        strong_flops = strong_secs = 0.0
        for s, t in zip(per["small"], per["strong"]):
            m = CascadeMonitor(policy)
            for lp in s["logprobs"]:
                if m.observe([lp]):
                    break  # the server stops the small model here
            model, _ = m.finish()
            used = len(m.logprobs)
            flops += _flops(small_path, s["prompt"], used)
            secs += (s["prompt"] + used) * secs_per_token["small"]
            st = _flops(strong_path, t["prompt"], len(t["logprobs"]))
            st_s = (t["prompt"] + len(t["logprobs"])) * secs_per_token["strong"]
            strong_flops += st
            strong_secs += st_s
            if model == policy.strong:
                escalated += 1
                flops += st
                secs += st_s
                correct += t["correct"]
            else:
                correct += s["correct"]
        n = len(per["small"])
        return {"threshold": policy.threshold, "accuracy": correct / n, "escalated": escalated / n,
                "flops_vs_strong": flops / strong_flops, "engine_seconds_vs_strong": secs / strong_secs}

    out: dict[str, Any] = {"questions_per_split": args.questions}
    for label in ("validation", "test"):
        _, per = data[label]
        out[label] = {name: sum(r["correct"] for r in rows) / len(rows) for name, rows in per.items()}
    curves: dict[str, list[dict]] = {}
    best: dict[str, Any] | None = None
    strong_val = out["validation"]["strong"]
    for metric, window in (("surprise", 16), ("lowest_window", 16), ("mean", 16), ("min", 16)):
        key = metric if metric != "lowest_window" else f"lowest_window/{window}"
        confs = []
        for s in data["validation"][1]["small"]:
            m = CascadeMonitor(CascadePolicy("small", "strong", -1e9, metric, window))
            m.observe(s["logprobs"])
            c = m.finish()[1]["confidence"]
            confs.append(c if c is not None else -1e9)
        thresholds = sorted({round(x, 4) for x in confs})
        grid = [thresholds[int(q * (len(thresholds) - 1))] + 1e-6 for q in [i / 40 for i in range(41)]]
        curve = [replay("validation", CascadePolicy("small", "strong", min(th, 0.0), metric, window))
                 for th in grid]
        curves[key] = curve
        for pt in curve:
            # No loss against strong-only on validation, at most half the requests escalated.
            ok = pt["accuracy"] >= strong_val and pt["escalated"] <= 0.5
            if ok and (best is None or pt["flops_vs_strong"] < best["flops_vs_strong"]):
                best = {**pt, "metric": metric, "window": window}
    out["validation_curves"] = curves
    if best is None:
        print("cascade: no threshold keeps accuracy within a point of strong-only with at most half escalated")
        return out
    policy = CascadePolicy("small", "strong", best["threshold"], best["metric"], best["window"])
    test = replay("test", policy)
    out["chosen_on_validation"] = best
    out["test_replay"] = test
    print(f"cascade: {best['metric']}/{best['window']} threshold {best['threshold']:.3f} chosen on validation; "
          f"test: accuracy {test['accuracy']:.1%} (strong-only {out['test']['strong']:.1%}, small-only "
          f"{out['test']['small']:.1%}), escalated {test['escalated']:.0%}, FLOPs {test['flops_vs_strong']:.2f}x "
          f"and engine-seconds {test['engine_seconds_vs_strong']:.2f}x strong-only", flush=True)
    out["served"] = _served_cascade(args, work, policy, data["test"][0])
    if args.plot:
        _plot(curves, best, test, out, args.plot)
    return out


def _served_cascade(args: argparse.Namespace, work: str, policy: Any, qs: list) -> dict[str, Any]:
    import httpx

    from tokenmill.demo import chain_question, chain_value, parse_answer

    doc = {"models": [{"name": "small", "path": _demo("chain_small"), "kv_cache_memory": 0.25},
                      {"name": "strong", "path": _demo("chain"), "kv_cache_memory": 0.25}],
           "tiers": [{"name": "tokenmill/auto", "route": {"policy": "cascade", "small": "small", "strong": "strong",
                                                          "threshold": float(policy.threshold),
                                                          "metric": policy.metric, "window": policy.window,
                                                          "margin": policy.margin}}]}
    res: dict[str, Any] = {}
    with _server(["--models", _yaml(os.path.join(work, "cascade.yaml"), doc)],
                 os.path.join(work, "cascade.log")) as base:
        async def send_all(model: str) -> tuple[list[dict], float]:
            sem = asyncio.Semaphore(16)
            async with httpx.AsyncClient(timeout=600) as http:
                async def one(nums, ops):
                    async with sem:
                        r = await http.post(base + "/v1/chat/completions", json={
                            "model": model, "temperature": 0, "max_tokens": args.max_tokens,
                            "messages": [{"role": "user", "content": chain_question(nums, ops)}]})
                        r.raise_for_status()
                        d = r.json()
                        return {"correct": parse_answer(d["choices"][0]["message"]["content"] or "")
                                == chain_value(nums, ops), "model": d["model"], "routing": d.get("routing")}
                t0 = time.perf_counter()
                rows = await asyncio.gather(*(one(n, o) for n, o in qs))
                return list(rows), time.perf_counter() - t0

        asyncio.run(send_all("strong"))  # warm-up of both paths, untimed
        strong_rows, strong_s = asyncio.run(send_all("strong"))
        tier_rows, tier_s = asyncio.run(send_all("tokenmill/auto"))
    n = len(qs)
    res = {"strong_only": {"accuracy": sum(r["correct"] for r in strong_rows) / n, "seconds": round(strong_s, 1)},
           "cascade": {"accuracy": sum(r["correct"] for r in tier_rows) / n, "seconds": round(tier_s, 1),
                       "escalated": sum(r["model"] == "strong" for r in tier_rows) / n},
           "time_vs_strong": round(tier_s / strong_s, 3)}
    print(f"cascade served: accuracy {res['cascade']['accuracy']:.1%} (strong-only through the same server "
          f"{res['strong_only']['accuracy']:.1%}), escalated {res['cascade']['escalated']:.0%}, wall time "
          f"{tier_s:.0f}s vs {strong_s:.0f}s = {res['time_vs_strong']:.2f}x", flush=True)
    return res


def _plot(curves: dict, best: dict, test: dict, out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, curve in curves.items():
        ax.plot([p["flops_vs_strong"] for p in curve], [100 * p["accuracy"] for p in curve], marker=".", label=key)
    ax.axhline(100 * out["validation"]["strong"], color="k", ls="--", lw=1, label="strong only")
    ax.axhline(100 * out["validation"]["small"], color="gray", ls=":", lw=1, label="small only")
    ax.scatter([best["flops_vs_strong"]], [100 * best["accuracy"]], s=80, facecolors="none", edgecolors="r",
               label=f"chosen ({best['metric']}, {best['threshold']:.2f})")
    ax.set_xlabel("compute (FLOPs) relative to strong-only")
    ax.set_ylabel("accuracy on validation chains (%)")
    ax.set_title("Cascade chain_small -> chain as the threshold moves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- mixed traffic -----------------------------------------------------------------------------------
def run_mixed(args: argparse.Namespace, work: str) -> dict[str, Any]:
    import httpx

    from tokenmill.bench.datasets import arrival_times
    from tokenmill.demo import chain_question, chain_questions, held_out_questions, question

    names = {"demo": _demo("demo"), "chain": _demo("chain"), "chain_small": _demo("chain_small")}
    order = list(names)
    chains = chain_questions(args.requests, split=0)
    arith = held_out_questions(args.requests)
    reqs = []
    for i in range(args.requests):
        name = order[i % 3]
        text = question(*arith[i]) if name == "demo" else chain_question(*chains[i])
        reqs.append((name, {"model": name, "temperature": 0, "max_tokens": 128, "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": text}]}))
    times = arrival_times(len(reqs), args.rate, 1.0, 0)
    kv = args.kv_cache_memory

    def run(models: list[str], tag: str) -> dict[str, dict]:
        from tokenmill.bench.serve_load import _one

        doc = {"models": [{"name": n, "path": names[n], "kv_cache_memory": kv} for n in models]}
        mine = [(at, r) for at, r in zip(times, reqs) if r[0] in models]
        with _server(["--models", _yaml(os.path.join(work, f"mixed_{tag}.yaml"), doc)],
                     os.path.join(work, f"mixed_{tag}.log")) as base:
            async def go() -> tuple[list, float]:
                async with httpx.AsyncClient(timeout=600) as http:
                    for n in models:  # first-step costs of each model, untimed
                        await http.post(base + "/v1/completions", json={"model": n, "prompt": "hi", "max_tokens": 2})
                    t0 = time.perf_counter()

                    async def one(at: float, name: str, body: dict):
                        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                        res = await _one(http, base + "/v1/chat/completions", body, 600)
                        return name, at, res

                    results = await asyncio.gather(*(one(at, n, b) for at, (n, b) in mine))
                    return list(results), time.perf_counter() - t0

            results, _ = asyncio.run(go())
        per: dict[str, dict] = {}
        for n in models:
            rs = [(at, r) for m, at, r in results if m == n]
            span = max(at + r.e2el for at, r in rs) - min(at for at, _ in rs)
            toks = sum(r.output_tokens for _, r in rs)
            per[n] = {"requests": len(rs), "errors": sum(not r.ok for _, r in rs), "output_tokens": toks,
                      "seconds": round(span, 2), "output_tokens_per_s": round(toks / span, 1),
                      "e2e_p50_s": round(statistics.median(r.e2el for _, r in rs), 3),
                      "ttft_p50_s": round(statistics.median(r.ttft for _, r in rs), 3)}
        return per

    mixed = run(order, "all")
    alone = {n: run([n], n)[n] for n in order}
    out: dict[str, Any] = {"rate": args.rate, "requests": args.requests, "mixed": mixed, "alone": alone}
    for n in order:
        ratio = mixed[n]["output_tokens_per_s"] / alone[n]["output_tokens_per_s"]
        out.setdefault("ratio", {})[n] = round(ratio, 3)
        print(f"mixed traffic: {n:12s} {mixed[n]['output_tokens_per_s']:7.1f} tok/s in the mix vs "
              f"{alone[n]['output_tokens_per_s']:7.1f} alone = {ratio:.0%} (goal >= 85%); e2e p50 "
              f"{mixed[n]['e2e_p50_s']:.2f}s vs {alone[n]['e2e_p50_s']:.2f}s", flush=True)
    return out


def run_park(args: argparse.Namespace, work: str) -> dict[str, Any]:
    import torch

    from tokenmill import LLM, SamplingParams

    llm = LLM(args.model or _demo("chain"), device=args.device, dtype=args.dtype,
              kv_cache_memory_bytes=int(args.kv_cache_memory * 2**30))
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompt = {"prompt_token_ids": [1 + (7 * i) % 100 for i in range(32)]}
    want = llm.generate([prompt], params)[0].outputs[0].token_ids
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    parks, unparks = [], []
    engine.add_request(prompt, params, request_id="p")
    got: list[int] = []
    steps = 0
    while engine.has_unfinished_requests():
        if steps % 8 == 4 and len(parks) < 10:  # across the running request
            sync()
            t0 = time.perf_counter()
            engine.park()
            sync()
            t1 = time.perf_counter()
            engine.unpark()
            sync()
            parks.append(1000 * (t1 - t0))
            unparks.append(1000 * (time.perf_counter() - t1))
        for out in engine.step():
            if out.finished:
                got = out.outputs[0].token_ids
        steps += 1
    out = {"model": engine.config.model, "device": str(engine.device), "dtype": str(engine.dtype),
           "weight_bytes": engine.runner.resident_weight_bytes,
           "kv_cache_bytes": engine.runner.num_blocks * engine.runner.kv_bytes_per_block,
           "park_ms": percentile_summary(parks), "unpark_ms": percentile_summary(unparks),
           "output_unchanged": got == want}
    park, unpark = out["park_ms"], out["unpark_ms"]
    print(f"park {park.get('p50', 0):.2f} ms p50 (max {park.get('max', 0):.2f}), unpark "
          f"{unpark.get('p50', 0):.2f} ms p50 (max {unpark.get('max', 0):.2f}) for "
          f"{out['weight_bytes'] / 1e9:.2f} GB of weights on {out['device']}; output unchanged: {got == want}",
          flush=True)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"--parts: unknown part {bad[0]!r} (choose from {', '.join(PARTS)})")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tokenmill-pool-bench-") as work:
        for part in parts:
            out[part] = {"swap": run_swap, "cascade": run_cascade, "mixed": run_mixed,
                         "park": run_park}[part](args, work)
            write_json(args.json, out)
    return out
