"""The `tokenmill` command line: serve, router, generate, chat, eval-demo, bench, tenants."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import time
from collections.abc import Iterator

from tokenmill.engine_args import add_engine_arguments, engine_config_from_args


def _llm(args: argparse.Namespace):
    from tokenmill import LLM

    cfg = engine_config_from_args(args)
    kwargs = {k: v for k, v in cfg.__dict__.items() if k != "model"}
    return LLM(cfg.model, **kwargs)


def _sampling(args: argparse.Namespace):
    from tokenmill import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sample_seed, stop=args.stop or None)


def _add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sample-seed", type=int, default=None, help="seed for this request's sampling")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")


def _generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _sampling(args)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    if args.stream:
        for piece in llm.stream(prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(llm.generate(prompt, params)[0].outputs[0].text)
    return 0


def _chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _sampling(args)
    params.validate(llm.engine.model_config.vocab_size)  # (before the first message: exit 2, not an error a turn)
    llm.chat_prompt([{"role": "user", "content": "hi"}])  # (a model without a chat template: the same)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("tokenmill chat: type a message; /reset clears the history, /exit leaves.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            for piece in llm.stream(llm.chat_prompt(history), params):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (ValueError, RuntimeError) as e:  # the conversation outgrew the context; an engine fault
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
    return 0


def _eval_demo(args: argparse.Namespace) -> int:
    from tokenmill.demo import evaluate

    if args.num_questions < 1 or args.show < 0:
        raise ValueError(f"--num-questions must be >= 1 and --show >= 0, got {args.num_questions} and {args.show}")
    t0 = time.time()
    llm = _llm(args)
    load_s = time.time() - t0
    result = evaluate(llm, args.num_questions, show=args.show)
    print(f"accuracy: {result['correct']}/{result['total']} = {result['accuracy']:.1%} on held-out questions "
          f"(greedy; additions {result['accuracy_add']:.1%}, subtractions {result['accuracy_sub']:.1%})")
    print(f"time: {result['seconds']:.1f}s for {result['total']} questions "
          f"({result['output_tokens']} output tokens, {result['output_tokens'] / result['seconds']:.0f} tok/s), "
          f"model load {load_s:.1f}s")
    print(f"'The weather today is' -> {result['weather']!r}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({**result, "load_seconds": load_s}, f, indent=2)
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.ray:
        from tokenmill.ray import run_ray

        return run_ray(args)
    from tokenmill.server.serve import run

    return run(args)


def _build_kernels(args: argparse.Namespace) -> int:
    from tokenmill.kernels import build

    return build(verbose=args.verbose)


def _bench(args: argparse.Namespace) -> int:
    from tokenmill.bench import check_json_path
    from tokenmill.engine.gc_heap import freeze_startup_heap

    check_json_path(getattr(args, "json", None))  # a path that cannot be written fails now, not after the run
    freeze_startup_heap()  # before any model: the benchmark's engines and baselines stay collectable
    with _sigterm_exits():
        res = importlib.import_module(f"tokenmill.bench.{args.bench_module}").run(args)
    if args.bench_module == "spec_decode" and not res["identical_outputs"]:
        return 1  # speculative decoding changed the output: the benchmark's own check failed
    return 0


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while the block runs, so that `finally` blocks run: Python's
    default action ends the process at once, leaving the `tokenmill serve` processes a benchmark
    started running. A second SIGTERM during that cleanup is ignored (the cleanup's own waits are
    bounded). Off the main thread (where signals cannot be handled) the block just runs."""
    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# tokenmill bench NAME: (module in tokenmill/bench, help, description)
BENCHMARKS = {
    "latency": ("latency", "batch-1 prefill and decode speed and bandwidth achieved "
                "(optionally beside llama.cpp's llama-bench)",
                "Batch-1 prefill and decode of one model folder at one dtype/quantization: tokens/s and memory "
                "bandwidth achieved (bytes read per token x tokens/s); with --llama-bench, llama.cpp on the same "
                "weights in the same run."),
    "attention": ("attention", "one layer's decode attention over a paged KV cache, per backend and tiling",
                  "Decode attention of one layer (a model shape's heads, shuffled block tables) for batch sizes and "
                  "context lengths: microseconds, bandwidth achieved against the read bandwidth measured in the "
                  "same run, the torch backend as baseline and the triton tilings beside it (on a GPU)."),
    "spec-decode": ("spec_decode", "batch-1 decode with and without speculative decoding",
                    "Batch-1 greedy decode of the same prompts with and without speculative decoding in one run: "
                    "tokens/s, ratio, acceptance, identical output."),
    "structured": ("structured", "batched decode step with and without JSON-schema constraints",
                   "The decode step of a batch (32) free and with every row constrained by a JSON schema, in one "
                   "run: step times, overhead, grammar time per step."),
    "ttc": ("ttc", "test-time compute strategies on the reasoning demo model",
            "Greedy, self-consistency (with its accuracy-vs-tokens curve), early stopping and best-of-n on "
            "held-out chain questions, the prefill count, and the strategy layer's time against plain n, in one run."),
    "throughput": ("throughput", "offline throughput against transformers' generate",
                   "Offline throughput: tokenmill vs transformers on the same random model."),
    "server-overhead": ("server_overhead",
                        "output tokens/s through the HTTP server vs the offline engine, same requests",
                        "The same requests through the offline engine and through `tokenmill serve` with concurrent "
                        "streaming clients."),
    "serve": ("serve_load", "load-test any OpenAI-compatible server: latency percentiles, goodput",
              "Send streaming requests on a seeded arrival schedule to an OpenAI-compatible server and report TTFT, "
              "TPOT, ITL and E2E percentiles, throughput and goodput; --sweep runs several rates and plots them."),
    "model-pool": ("model_pool", "the model pool: swap times, cascade accuracy vs cost, mixed traffic",
                   "Swaps between two demo-family models under load and a model loaded from disk beside dd; the "
                   "cascade tier's accuracy and compute on held-out chains; three models' throughput in one server "
                   "against each alone."),
    "fleet": ("fleet", "the router over 2 replicas: kv_aware vs round_robin, failover under SIGKILL, overhead",
              "A shared-prefix multi-tenant workload on 2 replicas with round_robin then kv_aware routing; 64 streams "
              "with one replica SIGKILLed midway against an undisturbed run; throughput through the router against "
              "talking to the replica directly."),
    "slo": ("slo", "interactive latency targets under 2x overload: fcfs vs the slo scheduling policy",
            "An unloaded baseline sets interactive targets (3x its TTFT and TPOT p50), a burst measures capacity, "
            "then a Poisson stream at 2x capacity (30%% interactive with targets, 70%% batch) runs against a fcfs "
            "server and an slo server: interactive attainment and batch throughput side by side."),
    "energy": ("energy", "energy, device time and FLOPs per output token, with the method's error bound",
               "A fixed offline workload (mixed prompt lengths, fixed output length) on the demo model and a "
               "SmolLM-135M-shaped one: energy per output token from the engine's accounting (RAPL, NVML or the "
               "power model), device seconds and FLOPs per token, and the error bound of the figure."),
    "rag": ("rag", "file_search's excerpts in score order vs document order: TTFT and prefix-cache hits",
            "One server with a vector store; the same Zipf-popular file_search chat requests with the excerpts in "
            "score order, then in document order (each under its own cache_salt): TTFT, prompt and cached tokens "
            "side by side."),
    "disagg": ("disagg", "fleet layouts with and without prefill workers: goodput predicted by the simulator "
               "and measured",
               "Calibrates the step-time model and the KV transfer here, predicts each layout's latencies, SLO "
               "attainment and goodput on a Poisson stream of long prompts (the fleet simulator), then runs the same "
               "requests on real servers behind `tokenmill router` for the --measure layouts, side by side."),
    "prefix-cache": ("prefix_cache", "bench serve's shared-prefix and multi-turn workloads against "
                     "`tokenmill serve` with prefix caching on, then off",
                     "Start `tokenmill serve` with prefix caching on, then off, run the shared-prefix and multi-turn "
                     "workloads against each and print TTFT, throughput and hit rates side by side."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: LLM inference on PyTorch. "
                                     "Without --model, commands use the demo model shipped in the package.")
    parser.add_argument("--log-level", default=None, type=str.lower,
                        choices=["debug", "info", "warning", "error", "critical"],
                        help="default: warning (info for serve)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Run the OpenAI-compatible HTTP server (/v1/completions, "
                           "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, /detokenize).")
    from tokenmill.server.serve import add_arguments as add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print the text",
                         description="Complete one prompt with the offline engine and print the text.")
    gen.add_argument("prompt")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    _add_sampling_arguments(gen, 64)
    add_engine_arguments(gen)
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal",
                          description="Chat in the terminal with streamed replies; the conversation is kept as "
                          "history. /reset clears it, /exit (or end of input) leaves.")
    chat.add_argument("--system", default=None, help="a system message")
    _add_sampling_arguments(chat, 256)
    add_engine_arguments(chat)
    chat.set_defaults(func=_chat)

    ev = sub.add_parser("eval-demo", help="the demo model's accuracy on held-out arithmetic questions",
                        description="Ask held-out 'What is a + b?' / 'What is a - b?' questions (greedy) and print "
                        "the accuracy and how long it took.")
    ev.add_argument("--num-questions", type=int, default=200)
    ev.add_argument("--show", type=int, default=3, help="print this many worked answers")
    ev.add_argument("--json", help="write the figures to this file")
    add_engine_arguments(ev)
    ev.set_defaults(func=_eval_demo)

    bk = sub.add_parser("build-kernels", help="compile tokenmill's CPU kernels for this machine now",
                        description="Compile tokenmill's CPU kernels (tokenmill/csrc) into PyTorch's extension cache. "
                        "They are otherwise built on first use; `make install` runs this.")
    bk.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    bk.set_defaults(func=_build_kernels)

    tenants = sub.add_parser("tenants", help="tools for a --tenants file",
                             description="Tools for the --tenants file of `tokenmill serve`.")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="TOOL")
    hk = tenants_sub.add_parser("hash-key", help="print the sha256 of an API key read from stdin",
                                description="Read an API key from stdin (prompted without echo on a terminal; "
                                "surrounding whitespace is dropped) and print its sha256, the form a --tenants "
                                "file stores in keys_sha256.")
    hk.set_defaults(func=_hash_key)

    router = sub.add_parser("router", help="one OpenAI-compatible endpoint over many replicas",
                            description="The fleet router: KV-aware routing over tokenmill replicas (--replica URL, "
                            "or --replicas N local ones), health checks, failover that resumes streams.")
    from tokenmill.router.cli import add_arguments as add_router_arguments

    add_router_arguments(router)
    router.set_defaults(func=_router)

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, (module, help_, description) in BENCHMARKS.items():
        b = bench_sub.add_parser(name, help=help_, description=description)
        importlib.import_module(f"tokenmill.bench.{module}").add_arguments(b)
        b.set_defaults(func=_bench, bench_module=module)
    return parser


def _hash_key(args: argparse.Namespace) -> int:
    from tokenmill.ops.tenants import hash_key

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key: ")
    else:
        key = sys.stdin.read()
    key = key.strip()
    if not key:
        raise ValueError("hash-key: no key on stdin")
    print(hash_key(key))
    return 0


def _router(args: argparse.Namespace) -> int:
    from tokenmill.router.cli import run

    return run(args, args.serve_args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "router":  # only the router passes arguments on (to its replicas)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.serve_args = extra
    level = args.log_level or ("INFO" if args.command in ("serve", "router") else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file a flag names (missing, a directory, not writable): its path is in the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
