"""The `tokenmill` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    out = llm.generate(args.prompt, params)[0]
    print(out.outputs[0].text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tokenmill.server.serve import run

    return run(args)


def _bench_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench.throughput import run

    run(args)
    return 0


def _bench_server_overhead(args: argparse.Namespace) -> int:
    from tokenmill.bench.server_overhead import run

    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: LLM inference on PyTorch")
    parser.add_argument("--log-level", default=None, help="debug, info, warning (default; info for serve), error")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    from tokenmill.server.serve import add_arguments as add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="Hugging Face model folder (default: the demo model)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput against transformers' generate")
    from tokenmill.bench.throughput import add_arguments

    add_arguments(tp)
    tp.set_defaults(func=_bench_throughput)
    so = bench_sub.add_parser("server-overhead",
                              help="output tokens/s through the HTTP server vs the offline engine, same requests")
    from tokenmill.bench.server_overhead import add_arguments as add_so_arguments

    add_so_arguments(so)
    so.set_defaults(func=_bench_server_overhead)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
