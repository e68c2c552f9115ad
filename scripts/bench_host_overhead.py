"""The engine's host work per decode step, on a model so small that its forward costs almost
nothing: what a fast accelerator would leave of a step (issue 16). Offline generation through
LLM.generate, every request decoding at once; prints the median step and its parts.

    python scripts/bench_host_overhead.py --batch 256 --sampling topk-topp
    python scripts/bench_host_overhead.py --batch 256 --vocab 1000 --async-scheduling on

With --async-scheduling on (as on a GPU) it also prints the host's work per step, the medians of
its parts summed (what a GPU step cannot hide once the device's step is shorter) and their means
(work done every few steps, a garbage collection, count there), and the longest step.

Run it at two commits on one quiet machine to compare (docs/benchmarks/gpu.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per request")
    ap.add_argument("--sampling", choices=["greedy", "temperature", "topk-topp"], default="greedy")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--async-scheduling", choices=["on", "off"], default="off")
    ap.add_argument("--tokenizer", action="store_true",
                    help="give the model a tokenizer (benchmarks' synthetic one): outputs are detokenized")
    args = ap.parse_args()

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.workload import make_random_model, save_synthetic_tokenizer
    from tokenmill.engine.gc_heap import freeze_startup_heap

    freeze_startup_heap()  # as a server does (TOKENMILL_GC_FREEZE=0 shows the collector's pauses)

    path = make_random_model(tempfile.mkdtemp() + "/tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, vocab_size=args.vocab)
    if args.tokenizer:
        save_synthetic_tokenizer(path, args.vocab)
    llm = LLM(path, max_num_seqs=args.batch, max_num_batched_tokens=max(2048, 16 * args.batch), dtype="float32",
              seed=0, async_scheduling=args.async_scheduling)
    eng, runner = llm.engine, llm.engine.runner
    times: dict[str, list[float]] = {}

    def timed(obj, name: str, key: str) -> None:
        f = getattr(obj, name)

        def g(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            times.setdefault(key, []).append(time.perf_counter() - t)
            return out
        setattr(obj, name, g)

    for obj, name, key in [(eng, "step", "step"), (runner, "execute", "execute"), (runner, "prepare", "prepare"),
                           (runner, "forward", "forward"), (runner, "_sample", "sample"),
                           (eng.scheduler, "schedule", "schedule"), (eng, "_observe_step", "observe"),
                           (eng, "_process", "process"), (eng.scheduler, "advance", "advance"),
                           (runner, "sample", "sample_all"), (runner, "collect", "collect")]:
        timed(obj, name, key)
    kw = {"greedy": dict(temperature=0.0), "temperature": dict(temperature=0.8),
          "topk-topp": dict(temperature=0.8, top_k=50, top_p=0.9)}[args.sampling]
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, args.vocab) for _ in range(16)]} for _ in range(args.batch)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.steps, ignore_eos=True, **kw))
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    # Decode steps only: the first steps prefill, the last ones drain.
    steps = times["step"][3:-2] or times["step"]

    def med(key: str) -> float:
        v = times[key][3:-2] or times[key]
        return 1000 * statistics.median(v)

    def mean(key: str) -> float:  # (what throughput pays: work done every few steps shows here)
        v = times[key][3:-2] or times[key]
        return 1000 * statistics.fmean(v)
    step = 1000 * statistics.median(steps)
    what = f"batch {args.batch}, {args.sampling}{', detokenized' if args.tokenizer else ''}"
    if args.async_scheduling == "off":
        parts = "  ".join(f"{k} {med(k):.2f}" for k in ("execute", "prepare", "forward", "sample"))
        print(f"{what}: {tokens / wall:.0f} tokens/s; median step {step:.2f} ms"
              f" (in it, ms: {parts}; engine outside execute {med('step') - med('execute'):.2f})")
    else:
        keys = ("schedule", "prepare", "observe", "process", "advance", "sample_all", "collect")
        parts = "  ".join(f"{k} {med(k):.2f}" for k in keys)
        print(f"{what}, async scheduling: {tokens / wall:.0f} tokens/s; median step {step:.2f} ms, longest "
              f"{1000 * max(times['step']):.1f} ms; host work per step {sum(med(k) for k in keys):.2f} ms "
              f"(mean {sum(mean(k) for k in keys):.2f}; ms: {parts}; forward {med('forward'):.2f} on this CPU)")


if __name__ == "__main__":
    main()
