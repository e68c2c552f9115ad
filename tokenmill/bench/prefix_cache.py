"""`tokenmill bench prefix-cache`: what automatic prefix caching buys, in one command.

Starts `tokenmill serve` twice in turn on the same model and engine settings, first with prefix
caching on, then with --no-enable-prefix-caching, and runs the same two `bench serve` workloads
against each: shared-prefix (long system prompts, short questions) and multi-turn (conversations
that resend their history). Prints TTFT, throughput and hit rates side by side with the on/off
ratios. Both servers see identical requests (same seed, greedy answers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator

from tokenmill.bench import check_at_least, write_json
from tokenmill.bench.datasets import WORDS
from tokenmill.bench.workload import make_random_model, save_synthetic_tokenizer

SERVED_NAME = "bench"
WORKLOADS = ("shared_prefix", "multi_turn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder; without config.json a random SmolLM-135M-shaped Llama is written "
                   "there (default: a temp dir); a synthetic word tokenizer is added when it has none")
    p.add_argument("--port-base", type=int, default=0,
                   help="caching on listens on this port, off on the next (default: free ports)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the server's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the server's")
    p.add_argument("--kv-cache-memory", type=float, default=2.0, metavar="GIB")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="chat needs a tokenizer with a chat template")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests in flight, both workloads")
    p.add_argument("--num-prompts", type=int, default=64, help="shared-prefix requests")
    p.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct system prompts")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens per system prompt")
    p.add_argument("--question-len", type=int, default=64, help="shared-prefix: tokens per question")
    p.add_argument("--num-conversations", type=int, default=16, help="multi-turn conversations (0 to skip)")
    p.add_argument("--num-turns", type=int, default=4)
    p.add_argument("--turn-len", type=int, default=64, help="multi-turn: tokens per new user message")
    p.add_argument("--output-len", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--output-range-ratio", type=float, default=0.5,
                   help="output lengths uniform in output-len * [1-r, 1+r]. Varied answer lengths are what real "
                        "traffic has; with 0, all requests in flight finish in the same step and the next ones "
                        "arrive together, so each TTFT waits for all of their prefills")
    p.add_argument("--text-prompts", action="store_true",
                   help="shared-prefix prompts as text (lengths then depend on the tokenizer) instead of token ids "
                        "of exactly --prefix-len and --question-len tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all figures to this file")


def run(args: argparse.Namespace) -> dict:
    from tokenmill.server.serve import free_port

    if not 0 <= args.output_range_ratio < 1:  # fail before any server starts
        raise ValueError(f"--output-range-ratio must be in [0, 1), got {args.output_range_ratio}")
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--num-prompts", args.num_prompts),
                        ("--num-prefixes", args.num_prefixes), ("--prefix-len", args.prefix_len),
                        ("--question-len", args.question_len), ("--output-len", args.output_len)):
        check_at_least(flag, value)
    if args.num_conversations > 0:
        check_at_least("--num-turns", args.num_turns)
        check_at_least("--turn-len", args.turn_len)
    if not args.kv_cache_memory > 0:
        raise ValueError(f"--kv-cache-memory must be > 0, got {args.kv_cache_memory:g}")
    workdir = tempfile.mkdtemp(prefix="tokenmill-prefix-cache-")
    model_dir = _prepare_model(args.model or os.path.join(workdir, "model"))
    workloads = {"shared_prefix": _workload_args(args, "shared-prefix", _vocab_size(model_dir))}
    if args.num_conversations > 0:
        workloads["multi_turn"] = _workload_args(args, "multi-turn", _vocab_size(model_dir))
    words = _vocabulary_words(model_dir)
    if words:  # the synthetic tokenizer knows no English: build prompts from its own words
        path = os.path.join(workdir, "words.txt")
        with open(path, "w") as f:
            f.write("\n".join(words))
        workloads = {k: [*v, "--word-list", path] for k, v in workloads.items()}
    ports = (args.port_base, args.port_base + 1) if args.port_base else (free_port(), free_port())
    skip = ("func", "command", "bench_command", "log_level")
    results: dict = {"model": model_dir, "settings": {k: v for k, v in vars(args).items() if k not in skip}}
    for (mode, extra), port in zip((("on", []), ("off", ["--no-enable-prefix-caching"])), ports):
        log_path = os.path.join(workdir, f"server-{mode}.log")
        with _server(model_dir, port, args, extra, log_path) as base:
            for name, argv in workloads.items():
                print(f"\n### prefix caching {mode}: {name.replace('_', '-')}", flush=True)
                results.setdefault(name, {})[mode] = _run_workload(base, argv)
    for name in workloads:
        results[name].update(_ratios(results[name]["on"], results[name]["off"]))
    print("\n" + format_table(results, args))
    write_json(args.json, results)
    return results


def _vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def _prepare_model(path: str) -> str:
    model_dir = make_random_model(path)
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        with open(os.path.join(model_dir, "config.json")) as f:
            save_synthetic_tokenizer(model_dir, json.load(f)["vocab_size"])
    return model_dir


def _vocabulary_words(model_dir: str) -> list[str] | None:
    """None when the datasets' English words are in the tokenizer's vocabulary. Otherwise (the
    synthetic word tokenizer) words it has as single tokens: prompts of English would be runs of
    <unk> that every request shares, and the hit rate would mean nothing."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    ids = tok.encode(" " + " ".join(WORDS)).ids
    if unk_id is None or ids.count(unk_id) < len(ids) / 2:
        return None
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    words = [t[1:] for t, _ in vocab if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha()]
    return words[:1000] or None


def _workload_args(args: argparse.Namespace, dataset: str, vocab: int) -> list[str]:
    common = ["--model", SERVED_NAME, "--endpoint", args.endpoint, "--dataset", dataset, "--request-rate", "inf",
              "--max-concurrency", str(args.max_concurrency), "--random-output-len", str(args.output_len),
              "--ignore-eos", "--seed", str(args.seed), "--output-range-ratio", str(args.output_range_ratio)]
    if dataset == "shared-prefix":
        ids = [] if args.text_prompts or args.endpoint == "chat" else ["--random-token-ids", "--vocab-size",
                                                                       str(vocab)]
        return [*common, "--num-prompts", str(args.num_prompts), "--num-prefixes", str(args.num_prefixes),
                "--prefix-len", str(args.prefix_len), "--question-len", str(args.question_len), *ids]
    return [*common, "--num-prompts", str(args.num_conversations), "--num-turns", str(args.num_turns),
            "--turn-len", str(args.turn_len)]


@contextlib.contextmanager
def _server(model_dir: str, port: int, args: argparse.Namespace, extra: list[str], log_path: str) -> Iterator[str]:
    import httpx

    from tokenmill.bench import running_server

    cmd = ["--log-level", "warning", "serve", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", args.dtype,
           "--device", args.device, "--kv-cache-memory", str(args.kv_cache_memory), "--seed", str(args.seed), *extra]
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens",
                                                               args.max_num_batched_tokens)):
        if value is not None:
            cmd += [flag, str(value)]
    with running_server(cmd, port, log_path,
                        lambda: f" ({' '.join(extra) or 'caching on'}):\n{_tail(log_path)}") as base:
        # One short request first, so neither workload pays the server's first-step costs.
        httpx.post(base + "/v1/completions", json={"model": SERVED_NAME, "prompt": "warm up", "max_tokens": 2},
                   timeout=120)
        yield base


def _tail(path: str, n: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def _run_workload(base: str, argv: list[str]) -> dict:
    from tokenmill.bench.serve_load import run as serve_run
    from tokenmill.cli import build_parser

    before = _cache_counters(base)
    s = serve_run(build_parser().parse_args(["bench", "serve", "--base-url", base, *argv]))
    after = _cache_counters(base)
    # The server's own view, from /metrics, to cross-check the clients' usage-based hit rate.
    queries = after[0] - before[0] if before and after else 0
    s["server_hit_rate"] = (after[1] - before[1]) / queries if queries else None
    return s


def _cache_counters(base: str) -> tuple[float, float] | None:
    """(queried, hit) prompt tokens from /metrics; None when the server does not export them."""
    import httpx

    totals: dict[str, float | None] = {"prefix_cache_queries_total": None, "prefix_cache_hits_total": None}
    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():  # (tokenmill's names, or vLLM's: a vLLM server, or --metric-names vllm)
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("tokenmill:").removeprefix("vllm:")
        if name in totals and not line.startswith("#"):
            totals[name] = (totals[name] or 0.0) + float(line.rsplit(" ", 1)[1])
    queries, hits = totals.values()
    return None if queries is None or hits is None else (queries, hits)


def _ratios(on: dict, off: dict) -> dict:
    def ratio(a: float, b: float) -> float | None:
        return a / b if b and not (math.isnan(a) or math.isnan(b)) else None

    return {"ttft_p50_ratio_off_on": ratio(off["ttft_ms"]["median"], on["ttft_ms"]["median"]),
            "ttft_p99_ratio_off_on": ratio(off["ttft_ms"]["p99"], on["ttft_ms"]["p99"]),
            "output_throughput_ratio_on_off": ratio(on["output_throughput"], off["output_throughput"])}


def format_table(results: dict, args: argparse.Namespace) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    def times(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    lines = [f"prefix caching on vs off ({results['model']}, {args.max_concurrency} requests in flight)",
             f"{'':<30}{'on':>12}{'off':>12}{'ratio':>16}"]
    titles = {"shared_prefix": f"shared-prefix: {args.num_prefixes} x {args.prefix_len}-token prefix, "
                               f"{args.question_len}-token questions, {args.num_prompts} requests",
              "multi_turn": f"multi-turn: {args.num_conversations} conversations x {args.num_turns} turns of "
                            f"{args.turn_len} tokens"}
    for name in WORKLOADS:
        if name not in results:
            continue
        r = results[name]
        on, off = r["on"], r["off"]
        rows = [
            ("TTFT p50 (ms)", f"{on['ttft_ms']['median']:.1f}", f"{off['ttft_ms']['median']:.1f}",
             f"{times(r['ttft_p50_ratio_off_on'])} off/on"),
            ("TTFT p99 (ms)", f"{on['ttft_ms']['p99']:.1f}", f"{off['ttft_ms']['p99']:.1f}",
             f"{times(r['ttft_p99_ratio_off_on'])} off/on"),
            ("output throughput (tok/s)", f"{on['output_throughput']:.1f}", f"{off['output_throughput']:.1f}",
             f"{times(r['output_throughput_ratio_on_off'])} on/off"),
            ("hit rate (usage)", pct(on["prefix_hit_rate"]), pct(off["prefix_hit_rate"]), ""),
            ("hit rate (/metrics)", pct(on["server_hit_rate"]), pct(off["server_hit_rate"]), ""),
        ]
        if "possible_reuse_rate" in on:
            rows += [("possible reuse", pct(on["possible_reuse_rate"]), pct(off["possible_reuse_rate"]), ""),
                     ("hit rate vs possible", pct(on["hit_rate_vs_possible"]), pct(off["hit_rate_vs_possible"]),
                      "")]
        rows.append(("failed requests", str(on["failed"]), str(off["failed"]), ""))
        lines.append(titles[name])
        lines += [f"  {label:<28}{a:>12}{b:>12}{c:>16}".rstrip() for label, a, b, c in rows]
    return "\n".join(lines)
