"""Benchmark requests: random, synthetic chat-like, shared-prefix, multi-turn, or from a JSONL
file. Shared by `bench serve` (text prompts over HTTP) and `bench throughput` (token ids offline).

synthetic-chat draws prompt and output lengths from log-normal distributions fitted to the
statistics usually published for ShareGPT conversations (mean about 200 prompt tokens and
180 output tokens, median well below the mean, long tails), and fills prompts with varied
English-like text, so a run resembles chat traffic without downloading ShareGPT.

shared-prefix and multi-turn look like the reuse a prefix cache is for: K long system prompts
shared by many short questions, and conversations that resend their whole history each turn.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

# Common English words: one token each in most tokenizers (with the leading space).
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "over new sound take only little work know place year live me back give most very after thing our just name "
    "good sentence man think say great where help through much before line right too mean old any same tell boy "
    "follow came want show also around form three small set put end does another well large must big even such "
    "because turn here why ask went men read need land different home us move try kind hand picture again change "
    "off play spell air away animal house point page letter mother answer found study still learn should world"
).split()
TOPICS = ["Explain", "Summarize", "Write a story about", "Give three tips on", "Compare", "Describe", "Translate",
          "What do you think about", "Help me plan", "Fix this text:"]


@dataclass
class Request:
    prompt: str | list[int]  # text, or token ids (completions endpoint only)
    prompt_len: int  # expected prompt tokens (exact for token ids, approximate for text)
    output_len: int
    messages: list[dict] | None = None  # what the chat endpoint sends (default: prompt as one user message)


@dataclass
class Conversation:
    """A multi-turn chat: turn k sends the history (user messages and the server's own answers) plus
    user_turns[k]; the answers only exist at run time, so the dataset holds the user side."""
    user_turns: list[str]
    output_lens: list[int]


def _lengths(rng: random.Random, mean: int, ratio: float) -> int:
    if not 0 <= ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def _text(rng: random.Random, n_words: int, pool: Sequence[str] | None = None) -> str:
    """n_words words drawn from pool (default: WORDS), as sentences."""
    words = [rng.choice(pool or WORDS) for _ in range(max(1, n_words))]
    # Sentences of 6-16 words, so the text is not one run-on line.
    out, i = [], 0
    while i < len(words):
        k = rng.randint(6, 16)
        sent = " ".join(words[i : i + k])
        out.append(sent[0].upper() + sent[1:] + ".")
        i += k
    return " ".join(out)


def _lognormal(rng: random.Random, mean: float, median: float, lo: int, hi: int) -> int:
    """A log-normal draw with the given mean and median, clipped to [lo, hi]."""
    mu = math.log(median)
    sigma = math.sqrt(2 * (math.log(mean) - mu))
    return int(min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))))


def token_id_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int,
                      seed: int) -> list[Request]:
    """Random token-id prompts with lengths uniform in the given [min, max] ranges (offline benchmarks)."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num):
        n_in, n_out = rng.randint(*input_len), rng.randint(*output_len)
        reqs.append(Request([rng.randrange(10, vocab) for _ in range(n_in)], n_in, n_out))
    return reqs


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                    vocab: int | None = None, shared_prefix_len: int = 0,
                    words: Sequence[str] | None = None) -> list[Request]:
    """Random prompts of input_len +- range_ratio tokens: token ids when vocab is given, else words."""
    rng = random.Random(seed)
    prefix_ids = [rng.randrange(10, vocab) for _ in range(shared_prefix_len)] if vocab else []
    prefix_text = _text(rng, shared_prefix_len, words) + " " if shared_prefix_len and not vocab else ""
    reqs = []
    for _ in range(num):
        n_in, n_out = _lengths(rng, input_len, range_ratio), _lengths(rng, output_len, range_ratio)
        if vocab:
            reqs.append(Request(prefix_ids + [rng.randrange(10, vocab) for _ in range(n_in)],
                                shared_prefix_len + n_in, n_out))
        else:
            reqs.append(Request(prefix_text + _text(rng, n_in, words), shared_prefix_len + n_in, n_out))
    return reqs


def synthetic_chat_requests(num: int, seed: int, shared_prefix_len: int = 0,
                            words: Sequence[str] | None = None) -> list[Request]:
    rng = random.Random(seed)
    prefix = _text(rng, shared_prefix_len, words) + "\n\n" if shared_prefix_len else ""
    reqs = []
    for _ in range(num):
        n_in = _lognormal(rng, mean=200, median=90, lo=4, hi=2000)
        n_out = _lognormal(rng, mean=180, median=120, lo=4, hi=1000)
        body = _text(rng, n_in - 4, words)
        reqs.append(Request(f"{prefix}{rng.choice(TOPICS)} {body}", shared_prefix_len + n_in, n_out))
    return reqs


def shared_prefix_requests(num: int, num_prefixes: int, prefix_len: int, question_len: int, output_len: int,
                           range_ratio: float, seed: int, vocab: int | None = None,
                           words: Sequence[str] | None = None,
                           output_range_ratio: float | None = None) -> list[Request]:
    """num_prefixes system prompts of prefix_len tokens; request i takes prefix i mod num_prefixes
    (each is used equally often) plus its own question of question_len +- range_ratio tokens; outputs
    of output_len +- output_range_ratio (default: range_ratio).
    Token ids when vocab is given (exact lengths), else words: completions get "prefix\n\nquestion",
    chat gets the prefix as the system message and the question as the user message."""
    if num_prefixes < 1 or prefix_len < 1 or question_len < 1:
        raise ValueError("--num-prefixes, --prefix-len and --question-len must be >= 1")
    rng = random.Random(seed)
    if vocab:
        prefix_ids = [[rng.randrange(10, vocab) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    else:
        # Each prefix ends a sentence, so the question cannot change how its last token is split.
        prefix_texts = [_text(rng, prefix_len, words) for _ in range(num_prefixes)]
    reqs = []
    for i in range(num):
        out_ratio = range_ratio if output_range_ratio is None else output_range_ratio
        n_q, n_out = _lengths(rng, question_len, range_ratio), _lengths(rng, output_len, out_ratio)
        if vocab:
            reqs.append(Request(prefix_ids[i % num_prefixes] + [rng.randrange(10, vocab) for _ in range(n_q)],
                                prefix_len + n_q, n_out))
        else:
            prefix, question = prefix_texts[i % num_prefixes], _text(rng, n_q, words)
            reqs.append(Request(f"{prefix}\n\n{question}", prefix_len + n_q, n_out,
                                messages=[{"role": "system", "content": prefix},
                                          {"role": "user", "content": question}]))
    return reqs


def multi_turn_conversations(num: int, num_turns: int, turn_len: int, output_len: int, range_ratio: float,
                             seed: int, words: Sequence[str] | None = None,
                             output_range_ratio: float | None = None) -> list[Conversation]:
    """num conversations of num_turns user messages of turn_len +- range_ratio words, each answered
    with output_len +- output_range_ratio (default: range_ratio) tokens."""
    if num_turns < 1 or turn_len < 1:
        raise ValueError("--num-turns and --turn-len must be >= 1")
    rng = random.Random(seed)
    convs = []
    for _ in range(num):
        turns, outs = [], []
        for _ in range(num_turns):
            turns.append(_text(rng, _lengths(rng, turn_len, range_ratio), words))
            outs.append(_lengths(rng, output_len, range_ratio if output_range_ratio is None else output_range_ratio))
        convs.append(Conversation(turns, outs))
    return convs


def read_words(path: str) -> list[str]:
    """Whitespace-separated words for text prompts (e.g. words a tokenizer has as single tokens)."""
    with open(path) as f:
        words = f.read().split()
    if not words:
        raise ValueError(f"--word-list: {path} has no words")
    return words


def file_requests(path: str, num: int | None = None) -> list[Request]:
    """JSONL, one request per line: {"prompt": "...", "output_len": 128} (prompt_len optional)."""
    reqs = []
    try:
        f = open(path)  # noqa: SIM115 (closed below)
    except OSError as e:  # a directory, a file that is not there or not readable
        raise ValueError(f"--dataset-path: cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompt, out_len = obj["prompt"], int(obj["output_len"])
                if not (isinstance(prompt, str) or (isinstance(prompt, list)
                                                    and all(isinstance(t, int) for t in prompt))):
                    raise TypeError("'prompt' must be a string or a list of token ids")
                if out_len < 1:
                    raise ValueError("'output_len' must be >= 1")
                plen = int(obj.get("prompt_len") or (len(prompt) if isinstance(prompt, list)
                                                     else len(prompt.split())))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"--dataset-path: line {lineno} of {path} needs 'prompt' and 'output_len' "
                                 f"('prompt_len' optional, a number): {e}") from None
            if num is not None and len(reqs) >= num:
                break
            reqs.append(Request(prompt, plen, out_len))
    if not reqs:
        raise ValueError(f"--dataset-path: {path} has no requests")
    return reqs


def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (seconds from start): gamma inter-arrivals with shape `burstiness` and mean
    1/rate (burstiness 1 = Poisson; < 1 burstier, > 1 more regular); rate inf = all at 0."""
    if not rate > 0 or not burstiness > 0 or math.isinf(burstiness):
        raise ValueError("--request-rate and --burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out
