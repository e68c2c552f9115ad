"""`tokenmill bench spec-decode`: batch-1 decode with and without speculative decoding, in one run.

Both engines load the same weights and decode the same prompts greedily, one request at a
time; the figures are output tokens/s over the decode (after the first token), the ratio,
the acceptance rate and the mean tokens each verification step yields, and whether the
outputs are identical (they must be).

Workloads
- `chat-arithmetic` (the demo model): few-shot chat with worked answers, then new questions;
  the answer repeats the template and the digits of the question.
- `random` (any model folder): random token ids. A random model's greedy output quickly
  repeats itself, which makes n-gram drafts nearly always right: the ceiling of the method.
  A --model folder without config.json gets a random model of --shape (with --load-format
  dummy only its config.json: an 8B shape on a GPU without writing a checkpoint).
- `chain` (tokenmill/demo_models/chain): held-out arithmetic chains through its chat template,
  answered step by step; with chain_small as the draft model.
- `--prompt-file`: one prompt per line (text, or JSON token-id lists).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from tokenmill.bench import check_at_least, torch_dtype, write_json
from tokenmill.bench.workload import SHAPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the demo model); one without "
                   "config.json gets a random model of --shape written into it")
    p.add_argument("--shape", default="smollm-135m", choices=sorted(SHAPES), help="that random model's shape")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone (the random workload needs no trained weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="each engine's share of a GPU: the two are in this process at once")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default=None, choices=["int8"])
    p.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4}',
                   help="JSON, vLLM's shape")
    p.add_argument("--workload", default="chat-arithmetic", choices=["chat-arithmetic", "random", "chain"])
    p.add_argument("--prompt-file", default=None, help="one prompt per line (text or a JSON list of token ids)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256, help="random workload: prompt tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this file")


def _prompt_lines(path: str) -> list[str]:
    """--prompt-file's non-empty lines; ValueError when it cannot be read or has none."""
    try:
        with open(path) as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError as e:
        raise ValueError(f"--prompt-file: cannot read {path}: {e.strerror or e}") from None
    if not lines:
        raise ValueError(f"--prompt-file: no prompts in {path}")
    return lines


def _prompts(args, llm) -> list:
    rng = random.Random(args.seed)
    if args.prompt_file:
        lines = _prompt_lines(args.prompt_file)
        return [{"prompt_token_ids": json.loads(ln)} if ln.lstrip().startswith("[") else ln
                for ln in lines][: args.num_prompts]
    if args.workload == "random":
        vocab = llm.engine.model_config.vocab_size
        return [{"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(args.prompt_len)]}
                for _ in range(args.num_prompts)]
    if args.workload == "chain":  # the held-out test split, as tokenmill.demo.evaluate_chain asks them
        from tokenmill.demo import chain_question, chain_questions

        return [llm.chat_prompt([{"role": "user", "content": chain_question(n, o)}])
                for n, o in chain_questions(args.num_prompts, split=0)]
    from tokenmill.demo import arithmetic_answer, question

    tok = llm.engine.tokenizer
    if tok is None or tok.chat_template is None:
        raise ValueError("--workload chat-arithmetic needs a model with a chat template (the demo model)")
    prompts = []
    for _ in range(args.num_prompts):
        msgs = []
        for _ in range(2):  # two worked examples, then the question
            a, op, b = rng.randrange(100, 1000), rng.choice("+-"), rng.randrange(100, 1000)
            msgs += [{"role": "user", "content": question(a, op, b)},
                     {"role": "assistant", "content": arithmetic_answer(a, op, b)}]
        a, op, b = rng.randrange(100, 1000), rng.choice("+-"), rng.randrange(100, 1000)
        msgs.append({"role": "user", "content": question(a, op, b)})
        prompts.append({"prompt_token_ids": tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)})
    return prompts


def _decode(llm, prompts, params) -> tuple[list[list[int]], float, int]:
    """Greedy decode of each prompt alone; (outputs, decode seconds after the first token, tokens)."""
    eng = llm.engine
    outs, secs, toks = [], 0.0, 0
    for p in prompts:
        rid = eng.add_request(p, params)
        final = None
        first_done = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.request_id == rid:
                    if first_done is None:
                        first_done = time.perf_counter()
                    final = o
        end = time.perf_counter()
        ids = final.outputs[0].token_ids
        outs.append(ids)
        secs += end - first_done
        toks += len(ids) - 1
    return outs, secs, toks


def run(args: argparse.Namespace) -> dict:
    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.config import SpeculativeConfig
    from tokenmill.llm import default_model_path

    check_at_least("--num-prompts", args.num_prompts)
    check_at_least("--max-tokens", args.max_tokens, 2)  # (decode is timed after the first token)
    check_at_least("--prompt-len", args.prompt_len)
    if args.threads is not None:
        check_at_least("--threads", args.threads)
    if args.prompt_file:
        _prompt_lines(args.prompt_file)  # (before the two engines load)
    torch_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SpeculativeConfig.parse(args.speculative_config)
    model = args.model or default_model_path()
    if not os.path.exists(os.path.join(model, "config.json")):
        from tokenmill.bench.workload import make_random_model

        model = make_random_model(model, shape_name=args.shape, weights=args.load_format != "dummy")
    common = dict(dtype=args.dtype, quantization=args.quantization, max_num_seqs=1, enable_prefix_caching=False,
                  max_model_len=None, device=args.device, load_format=args.load_format,
                  gpu_memory_utilization=args.gpu_memory_utilization)
    base = LLM(model, **common)
    fast = LLM(model, speculative_config=spec, **common)
    prompts = _prompts(args, base)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=args.workload == "random")
    _decode(base, prompts[:1], params)  # warm-up
    _decode(fast, prompts[:1], params)
    st0 = fast.engine.spec_stats
    d0, a0, n0 = st0.num_draft_tokens, st0.num_accepted_tokens, st0.num_drafts
    # Interleave the two, prompt by prompt, so that machine noise hits both alike.
    rb, rf = [], []
    for p in prompts:
        rb.append(_decode(base, [p], params))
        rf.append(_decode(fast, [p], params))
    st = fast.engine.spec_stats
    drafted, accepted, steps = st.num_draft_tokens - d0, st.num_accepted_tokens - a0, st.num_drafts - n0
    out_b = [o for r in rb for o in r[0]]
    out_f = [o for r in rf for o in r[0]]
    if not sum(r[2] for r in rb) or not sum(r[2] for r in rf):  # (every answer ended at its first token)
        raise RuntimeError("no tokens decoded after the first: every answer ended at once, nothing to time "
                           "(a --workload or --prompt-file whose answers are longer, or --workload random)")
    tb = sum(r[2] for r in rb) / sum(r[1] for r in rb)
    tf = sum(r[2] for r in rf) / sum(r[1] for r in rf)
    per_prompt = [(f[2] / f[1]) / (b[2] / b[1]) for b, f in zip(rb, rf) if b[2] and f[2] and b[1] and f[1]]
    res = {
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "baseline_decode_tok_s": tb, "spec_decode_tok_s": tf, "speedup": tf / tb,
        "speedup_median_prompt": statistics.median(per_prompt) if per_prompt else None,
        "identical_outputs": out_b == out_f,
        "draft_tokens": drafted, "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_verify_step": (accepted + steps) / steps if steps else 1.0,
        "output_tokens": sum(len(o) for o in out_f),
    }
    print(f"model {model} ({args.dtype}{' + ' + args.quantization if args.quantization else ''}), "
          f"workload {'file' if args.prompt_file else args.workload}, {len(prompts)} prompts, "
          f"{res['output_tokens']} output tokens; speculative_config {args.speculative_config}")
    median = res["speedup_median_prompt"]
    print(f"batch-1 decode: baseline {tb:.1f} tok/s, speculative {tf:.1f} tok/s -> {tf / tb:.2f}x "
          f"(median over prompts {'n/a' if median is None else f'{median:.2f}x'})")
    print(f"drafts: {drafted} tokens, {accepted} accepted ({res['acceptance_rate']:.0%}), "
          f"{res['tokens_per_verify_step']:.2f} tokens per verification step; "
          f"identical outputs: {res['identical_outputs']}")
    write_json(args.json, res)
    return res
