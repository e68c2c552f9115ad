"""`tokenmill bench ttc`: what test-time compute buys on the reasoning demo model, in one run.

On held-out chain questions (tokenmill.demo, "What is 964 + 530 - 75 - 902?", split 0, never
trained on) it measures, with the same engine:
- greedy accuracy (one path);
- self-consistency with n paths (sampled, majority vote over "The answer is N."), and the
  accuracy of its first k paths for k = 1, 2, 4, ... (the accuracy-vs-tokens curve);
- self-consistency with early stopping (waves, settled votes, confidence pruning), and the same
  with DeepConf's consensus stop (--consensus, the leader's share of the first votes);
- best-of-n by mean token logprob;
- beam search (deterministic, --beams wide), the best beam's answer;
- the prompt's prefill: prompt tokens the model computed against the prompts' length, for
  requests run alone (in a batch too large for the KV cache, preempted paths recompute theirs);
- the strategy layer's cost: one request's n paths through test_time_compute against the same
  request with plain n (the same seeds, so the same paths), timed one request at a time.
With --plot, accuracy against generated tokens per question, per strategy (matplotlib).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Any

from tokenmill.bench import write_json

PATTERN = r"The answer is (-?\d+)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the reasoning demo model)")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--consensus", type=float, default=0.95, help="early stop's consensus rule (0: skip that run)")
    p.add_argument("--beams", type=int, default=4, help="beam search width (0: skip beam search)")
    p.add_argument("--timed", type=int, default=8, help="requests timed one at a time for the overhead ratio")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-tokens plot to this PNG")


def default_model() -> str:
    import tokenmill

    return os.path.join(os.path.dirname(tokenmill.__file__), "demo_models", "chain")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.demo import chain_question, chain_questions, chain_value, parse_answer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or default_model()
    if not os.path.isdir(model):
        raise SystemExit(f"{model}: no such model folder (the reasoning demo model is not shipped yet: "
                         f"train one with scripts/train_demo_model.py --task chain and pass --model)")
    llm = LLM(model, dtype="float32", seed=0)
    qs = chain_questions(args.questions, split=0)
    prompts = [llm.chat_prompt([{"role": "user", "content": chain_question(n, o)}]) for n, o in qs]
    truth = [str(chain_value(n, o)) for n, o in qs]
    sampled = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=1)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))  # warm-up: first-call costs untimed
    out: dict[str, Any] = {"questions": len(qs), "n": args.n, "temperature": args.temperature}

    def record(name: str, answers: list[str | None], tokens: int, seconds: float) -> None:
        acc = sum(a == t for a, t in zip(answers, truth)) / len(qs)
        out[name] = {"accuracy": acc, "generated_tokens": tokens, "tokens_per_question": tokens / len(qs),
                     "seconds": round(seconds, 1)}
        print(f"{name:28s} accuracy {acc:6.1%}   {tokens / len(qs):8.0f} generated tokens/question   "
              f"{seconds:6.1f}s", flush=True)

    t = time.time()
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    record("greedy", [_str(parse_answer(o.outputs[0].text)) for o in greedy],
           sum(len(o.outputs[0].token_ids) for o in greedy), time.time() - t)

    eng = llm.engine
    t = time.time()
    sc = llm.generate(prompts, sampled, test_time_compute={"n": args.n, "answer_pattern": PATTERN})
    record(f"self_consistency@{args.n}", [o.test_time_compute["answer"] for o in sc],
           sum(o.test_time_compute["tokens"]["generated"] for o in sc), time.time() - t)
    # The curve: the first k paths of each run, voted.
    curve = []
    k = 1
    while k <= args.n:
        answers, tokens = [], 0
        for o in sc:
            paths = o.test_time_compute["paths"][:k]
            tokens += sum(p["tokens"] for p in paths)
            votes = Counter(p["answer"] for p in paths if p["answer"] is not None)
            answers.append(_winner(votes, paths))
        acc = sum(a == t for a, t in zip(answers, truth)) / len(qs)
        curve.append({"k": k, "accuracy": acc, "tokens_per_question": tokens / len(qs)})
        print(f"  first {k:2d} paths voted: accuracy {acc:6.1%}   {tokens / len(qs):8.0f} tokens/question")
        k *= 2
    out["self_consistency_curve"] = curve

    t = time.time()
    es = llm.generate(prompts, sampled, test_time_compute={"n": args.n, "answer_pattern": PATTERN,
                                                           "early_stop": True})
    record(f"early_stop@{args.n}", [o.test_time_compute["answer"] for o in es],
           sum(o.test_time_compute["tokens"]["generated"] for o in es), time.time() - t)
    def saved(name: str) -> float:  # the share of plain self-consistency's generated tokens a run saved
        return 1 - out[name]["generated_tokens"] / out[f"self_consistency@{args.n}"]["generated_tokens"]

    out["early_stop_tokens_saved"] = saved(f"early_stop@{args.n}")
    print(f"  early stopping: {out['early_stop_tokens_saved']:.1%} fewer generated tokens than plain "
          f"self-consistency", flush=True)

    if args.consensus:
        t = time.time()
        ec = llm.generate(prompts, sampled, test_time_compute={"n": args.n, "answer_pattern": PATTERN,
                                                               "early_stop": True, "consensus": args.consensus})
        name = f"early_stop+consensus@{args.n}"
        record(name, [o.test_time_compute["answer"] for o in ec],
               sum(o.test_time_compute["tokens"]["generated"] for o in ec), time.time() - t)
        out["early_stop_consensus_tokens_saved"] = saved(name)
        print(f"  with consensus {args.consensus}: {saved(name):.1%} fewer generated tokens than plain "
              f"self-consistency", flush=True)

    t = time.time()
    bo = llm.generate(prompts, sampled, test_time_compute={"n": args.n, "strategy": "best_of_n"})
    record(f"best_of_n@{args.n}", [_str(parse_answer(o.outputs[0].text)) for o in bo],
           sum(o.test_time_compute["tokens"]["generated"] for o in bo), time.time() - t)

    if args.beams:
        t = time.time()
        bs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens),
                          test_time_compute={"strategy": "beam_search", "n": args.beams})
        record(f"beam_search@{args.beams}", [_str(parse_answer(o.outputs[0].text)) for o in bs],
               sum(o.test_time_compute["tokens"]["generated"] for o in bs), time.time() - t)

    # The strategy layer's cost: the same request (same seeds, so the same paths) alone; and its
    # prefill, counted by the scheduler (a request alone is never preempted, so nothing is recomputed).
    plain_s = ttc_s = 0.0
    computed = 0
    for p in prompts[: args.timed]:
        t = time.time()
        llm.generate(p, SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=1))
        plain_s += time.time() - t
        eng.reset_prefix_cache()
        before = eng.stats()["prompt_tokens_computed"]
        t = time.time()
        llm.generate(p, sampled, test_time_compute={"n": args.n, "answer_pattern": PATTERN})
        ttc_s += time.time() - t
        computed += eng.stats()["prompt_tokens_computed"] - before
    timed_prompt = sum(len(p["prompt_token_ids"]) for p in prompts[: args.timed])
    out["prefill"] = {"requests": args.timed, "prompt_tokens": timed_prompt, "prompt_tokens_computed": computed,
                      "paths": args.n * args.timed}
    print(f"prefill: {computed} prompt tokens computed for {args.timed} requests of {timed_prompt} prompt tokens "
          f"and {args.n * args.timed} paths", flush=True)
    out["overhead"] = {"requests": args.timed, "plain_n_seconds": plain_s, "test_time_compute_seconds": ttc_s,
                       "ratio": ttc_s / plain_s}
    print(f"one request, {args.n} paths: plain n {plain_s / args.timed:.2f}s, test_time_compute "
          f"{ttc_s / args.timed:.2f}s, ratio {ttc_s / plain_s:.2f}x", flush=True)
    write_json(args.json, out)
    if args.plot:
        plot(out, args.plot)
    return out


def _str(v: int | None) -> str | None:
    return None if v is None else str(v)


def _winner(votes: Counter, paths: list[dict[str, Any]]) -> str | None:
    if not votes:
        return None
    best = max(votes.values())
    tied = [a for a, c in votes.items() if c == best]

    def mean_lp(a: str) -> float:
        lps = [p["mean_logprob"] for p in paths if p["answer"] == a and p["mean_logprob"] is not None]
        return sum(lps) / len(lps) if lps else float("-inf")

    return max(tied, key=mean_lp)


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = out["self_consistency_curve"]
    ax.plot([c["tokens_per_question"] for c in curve], [100 * c["accuracy"] for c in curve], "o-",
            label="self-consistency, first k paths")
    for c in curve:
        ax.annotate(f"k={c['k']}", (c["tokens_per_question"], 100 * c["accuracy"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    n = out["n"]
    points = [("greedy", "s"), (f"early_stop@{n}", "D"), (f"early_stop+consensus@{n}", "P"), (f"best_of_n@{n}", "^")]
    points = [(k, m) for k, m in points if k in out]
    points += [(k, "v") for k in out if k.startswith("beam_search@")]
    for name, marker in points:
        r = out[name]
        ax.plot([r["tokens_per_question"]], [100 * r["accuracy"]], marker, markersize=9, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per question (log scale)")
    ax.set_ylabel("accuracy on held-out chains (%)")
    ax.set_title(f"Test-time compute on the reasoning demo model ({out['questions']} questions)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
