"""`tokenmill bench structured`: what structured outputs cost a batched decode step, in one run.

The same engine decodes the same batch (default 32 sequences, SmolLM-135M's shape, random
weights) twice per round: free, and with every sequence constrained by a JSON schema. The
figures are the median decode-step times of both, the overhead of the constrained step, and
the time of the grammar work itself within it (filling the allowed-token masks, applying them
to the logits, advancing the matchers), measured around those calls.

The model is random, but the tokenizer is a real byte-level BPE of 49,152 tokens trained here
on this machine's Python sources (nothing is downloaded): a mask's cost depends on the
vocabulary's shape (how many tokens hold quotes, digits, braces), which a synthetic word list
would not have. The schema is an array of records with strings, integers, enums and nested
arrays whose minItems keeps it from ending within the measured steps.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sysconfig
import tempfile
import time

from tokenmill.bench import check_at_least, write_json

SCHEMA = {
    "type": "array", "minItems": 500,
    "items": {"type": "object", "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["user", "admin", "service", "guest"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"}},
        "required": ["id", "name", "kind", "score", "tags", "active"]},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder with a tokenizer (default: a random SmolLM-135M "
                   "shape with a BPE tokenizer trained here, cached in --workdir)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tokenmill-bench-structured"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per run")
    p.add_argument("--rounds", type=int, default=3, help="free / constrained runs, alternated")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")


def bpe_tokenizer(path: str, vocab_size: int = 49152) -> None:
    """A byte-level BPE trained on the standard library's sources (code, JSON-like punctuation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))[:1500]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        for f in files:
            with open(f, "rb") as fh:
                yield fh.read().decode("utf-8", "replace")

    tok.train_from_iterator(texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


class _Timer:
    """Wall time spent in the wrapped functions."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t
        return timed


def _run(llm, batch: int, steps: int, constrained: bool, timer: _Timer) -> tuple[list[float], float]:
    """Median-ready decode-step times of one batch, and the grammar seconds within those steps."""
    from tokenmill import SamplingParams
    from tokenmill.structured import StructuredOutputsParams

    eng = llm.engine
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=steps + 4, ignore_eos=True, structured_outputs=so)
    for i in range(batch):
        eng.add_request({"prompt_token_ids": [5 + i, 17, 99, 3, 250, 41, 7, 8]}, params)
    eng.step()  # the prefills, and the first tokens
    times = []
    timer.seconds = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    grammar = timer.seconds
    while eng.has_unfinished_requests():
        eng.step()
    return times, grammar


def run(args: argparse.Namespace) -> dict:
    import torch

    from tokenmill import LLM, structured
    from tokenmill.bench.workload import make_random_model
    from tokenmill.engine import model_runner
    from tokenmill.sample import sampler

    for flag, value in (("--batch", args.batch), ("--steps", args.steps), ("--rounds", args.rounds)):
        check_at_least(flag, value)
    if args.threads is not None:
        check_at_least("--threads", args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        model = os.path.join(args.workdir, "smol")
        make_random_model(model)
        bpe_tokenizer(model)
    llm = LLM(model, max_num_seqs=args.batch, enable_prefix_caching=False, max_model_len=1024)

    # Time the grammar work where the engine calls it: masks filled (runner), applied (sampler),
    # matchers advanced (engine, through the sequences' matchers).
    timer = _Timer()
    sampler.apply_bitmask = timer.wrap(structured.apply_bitmask)
    compiled = llm.engine.grammars.compile(structured.StructuredOutputsParams(json=SCHEMA))

    class TimedMatcher:
        def __init__(self, m) -> None:
            self._m = m

        def __getattr__(self, name):
            attr = getattr(self._m, name)
            return timer.wrap(attr) if name in ("consume_token", "is_stopped") else attr

    make = compiled.matcher
    compiled.matcher = lambda: TimedMatcher(make())
    # The runner hands the matchers to llguidance, which needs the real objects.
    fill = structured.fill_bitmask
    model_runner.fill_bitmask = timer.wrap(lambda rows, v: fill([(getattr(m, "_m", m), d) for m, d in rows], v))

    _run(llm, args.batch, 4, False, timer)  # warm-up, both ways
    _run(llm, args.batch, 4, True, timer)
    free, cons, grammar = [], [], []
    for _ in range(args.rounds):
        t, _g = _run(llm, args.batch, args.steps, False, timer)
        free += t
        t, g = _run(llm, args.batch, args.steps, True, timer)
        cons += t
        grammar.append(g / args.steps)
    f, c = statistics.median(free), statistics.median(cons)
    g = statistics.median(grammar)
    res = {"args": {k: v for k, v in vars(args).items() if not callable(v)}, "model": model,
           "vocab_size": llm.engine.model_config.vocab_size, "free_step_ms": f * 1e3,
           "constrained_step_ms": c * 1e3, "overhead": c / f - 1, "grammar_ms_per_step": g * 1e3,
           "grammar_share_of_free_step": g / f}
    print(f"model {model}, vocab {res['vocab_size']}, batch {args.batch}, {args.steps} decode steps x "
          f"{args.rounds} rounds, JSON schema on every row")
    print(f"decode step: free {f * 1e3:.1f} ms, constrained {c * 1e3:.1f} ms -> overhead {res['overhead']:+.1%}; "
          f"grammar work {g * 1e3:.2f} ms per step = {res['grammar_share_of_free_step']:.1%} of a free step")
    write_json(args.json, res)
    return res
