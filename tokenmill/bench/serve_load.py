"""`tokenmill bench serve`: a load generator for any OpenAI-compatible server.

Requests are sent on a seeded arrival schedule (Poisson, or gamma with --burstiness) and
streamed; per request the client records TTFT (send to the first chunk carrying a token),
inter-token latencies (gaps between those chunks), E2E latency, and token counts from the
server's `usage`; TPOT = (E2E - TTFT) / (output tokens - 1). Failed requests are counted
and their errors shown, never dropped. The flag names follow vLLM's benchmark_serving.

Prefix caching: every report sums `usage.prompt_tokens_details.cached_tokens` (tokenmill and
vLLM send it) into a hit rate. --dataset multi-turn runs conversations whose turns go one
after another, each resending the history with the server's real answers; after the timed run
it tokenizes the prompts through the server's /tokenize to count how many prompt tokens a
perfect cache could have served (possible reuse), the yardstick for the measured hit rate.
--sweep sends the same requests at every rate, each rate under its own `cache_salt` (tokenmill
and vLLM take the field), so that no rate finds an earlier rate's prompts in the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tokenmill.bench import write_json
from tokenmill.bench.datasets import (
    Conversation,
    Request,
    arrival_times,
    file_requests,
    multi_turn_conversations,
    random_requests,
    read_words,
    shared_prefix_requests,
    synthetic_chat_requests,
)
from tokenmill.stats import percentile

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", choices=["random", "synthetic-chat", "shared-prefix", "multi-turn", "file"],
                   default="synthetic-chat")
    p.add_argument("--dataset-path", help="JSONL for --dataset file: {\"prompt\": ..., \"output_len\": N} per line")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128,
                   help="output tokens per request (random, shared-prefix) or per turn (multi-turn)")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len * [1-r, 1+r]")
    p.add_argument("--no-answer-ids", dest="answer_ids", action="store_false",
                   help="multi-turn: do not ask for the answers' token ids (logprobs + return_tokens_as_token_ids, "
                        "for the possible-reuse figure); for servers that refuse those fields")
    p.add_argument("--output-range-ratio", type=float, default=None,
                   help="shared-prefix and multi-turn: output lengths' own range ratio (default: --random-range-ratio)")
    p.add_argument("--random-token-ids", action="store_true",
                   help="random and shared-prefix prompts as token ids (exact lengths; completions endpoint only)")
    p.add_argument("--vocab-size", type=int, default=32000, help="id range for --random-token-ids")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="random, synthetic-chat: a prefix of this many tokens common to all requests")
    p.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct system prompts (K)")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens per system prompt")
    p.add_argument("--question-len", type=int, default=64, help="shared-prefix: tokens of each request's question")
    p.add_argument("--num-turns", type=int, default=4, help="multi-turn: requests per conversation")
    p.add_argument("--turn-len", type=int, default=64, help="multi-turn: tokens of each new user message")
    p.add_argument("--word-list", help="text prompts draw words from this file (whitespace-separated; default: "
                   "common English words); for tokenizers without English words")
    p.add_argument("--num-prompts", type=int, default=200, help="requests; for multi-turn: conversations")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s ('inf': all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly each request's output length")
    p.add_argument("--slo", default="", help="goodput targets, e.g. ttft_ms=500,tpot_ms=100,e2el_ms=20000")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--sweep", help="comma-separated request rates (e.g. 1,2,4,inf): one run per rate")
    p.add_argument("--plot-dir", help="with --sweep: write PNG plots here")
    p.add_argument("--no-cache-salt", dest="cache_salt", action="store_false",
                   help="with --sweep: send no per-rate cache_salt (for servers that refuse the field); every rate "
                        "sends the same prompts, so later rates then find earlier rates' prompts in the prefix cache")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens; None: not reported
    ttft: float = 0.0
    e2el: float = 0.0
    itls: list[float] = field(default_factory=list)
    text: str = ""  # the generated text (choice 0); multi-turn sends it back
    # The generated token ids (choice 0), when asked for through logprobs with
    # return_tokens_as_token_ids; None when the server did not send them.
    token_ids: list[int] | None = None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or not self.itls:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def parse_slo(text: str) -> dict[str, float]:
    slo = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = part.partition("=")
        if key not in ("ttft_ms", "tpot_ms", "e2el_ms") or not value:
            raise ValueError(f"--slo: expected ttft_ms=..., tpot_ms=..., e2el_ms=..., got {part!r}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {part!r} is not a number") from None
        if not slo[key] > 0:
            raise ValueError(f"--slo: {key} must be a positive number of milliseconds")
    return slo


def build_requests(args: argparse.Namespace) -> list[Request] | list[Conversation]:
    """The requests, or for multi-turn the conversations (--num-prompts of them)."""
    words = read_words(args.word_list) if args.word_list else None
    vocab = args.vocab_size if args.random_token_ids else None
    if vocab and (args.endpoint == "chat" or args.dataset not in ("random", "shared-prefix")):
        raise ValueError("--random-token-ids works with --endpoint completions and --dataset random or "
                         "shared-prefix only")
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, vocab, args.shared_prefix_len, words)
    if args.dataset == "synthetic-chat":
        return synthetic_chat_requests(args.num_prompts, args.seed, args.shared_prefix_len, words)
    if args.dataset == "shared-prefix":
        return shared_prefix_requests(args.num_prompts, args.num_prefixes, args.prefix_len, args.question_len,
                                      args.random_output_len, args.random_range_ratio, args.seed, vocab, words,
                                      args.output_range_ratio)
    if args.dataset == "multi-turn":
        return multi_turn_conversations(args.num_prompts, args.num_turns, args.turn_len, args.random_output_len,
                                        args.random_range_ratio, args.seed, words, args.output_range_ratio)
    if not args.dataset_path:
        raise ValueError("--dataset file needs --dataset-path")
    return file_requests(args.dataset_path, args.num_prompts)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:  # nothing measured: NaN, not a flattering 0
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan}
    return {"mean": sum(values) / len(values), "median": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def summarize(results: list[RequestResult], duration: float, slo: dict[str, float], rate: float) -> dict:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out = {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "completed": len(done), "failed": len(failed), "duration_s": duration,
        "errors": dict(Counter(r.error for r in failed).most_common(10)),
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": sum(r.output_tokens for r in done),
        "request_throughput": len(done) / duration,
        "input_throughput": sum(r.prompt_tokens for r in done) / duration,
        "output_throughput": sum(r.output_tokens for r in done) / duration,
        "ttft_ms": _percentiles([r.ttft * 1000 for r in done]),
        "tpot_ms": _percentiles([r.tpot * 1000 for r in done if r.tpot is not None]),
        "itl_ms": _percentiles([x * 1000 for r in done for x in r.itls]),
        "e2el_ms": _percentiles([r.e2el * 1000 for r in done]),
    }
    # Hit rate over the requests whose server reported cached tokens; None, not 0, when none did.
    known = [r for r in done if r.cached_tokens is not None]
    cached, prompt = sum(r.cached_tokens for r in known), sum(r.prompt_tokens for r in known)
    out["cached_tokens"] = cached if known else None
    out["prefix_hit_rate"] = cached / prompt if known and prompt else None
    good = 0
    for r in done:
        tpot = r.tpot if r.tpot is not None else (r.e2el - r.ttft)  # one token: its whole decode time
        checks = {"ttft_ms": r.ttft * 1000, "tpot_ms": tpot * 1000, "e2el_ms": r.e2el * 1000}
        good += all(checks[k] <= target for k, target in slo.items())
    out["goodput"] = {"request_rate": good / duration, "fraction": good / max(1, len(results)), "slo": slo}
    return out


async def _first_model(http, base: str) -> str:
    try:
        r = await http.get(base + "/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except Exception as e:
        raise ValueError(f"--base-url: cannot list models at {base}/v1/models ({type(e).__name__}: {e}); "
                         "is the server up? (--model skips this)") from None


async def _one(http, url: str, body: dict, timeout: float) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(http, url, body, res, start), timeout)
    except asyncio.TimeoutError:
        res.ok, res.error = False, f"timed out after {timeout:g}s"
    except Exception as e:  # a dropped connection or bad data is a failed request, counted in the report
        res.ok, res.error = False, f"{type(e).__name__}: {str(e)[:120]}"
    return res


def _error_message(obj) -> str:
    err = obj.get("error") if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        err = err.get("message")
    return str(err if err is not None else obj)[:120]


async def _stream(http, url: str, body: dict, res: RequestResult, start: float) -> None:
    last = None
    first_choice = None  # when the first chunk with a choice came, token or not
    chunks = 0
    done = False
    pieces: list[str] = []
    ids: list[int] | None = [] if body.get("return_tokens_as_token_ids") else None
    async with http.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            try:
                msg = _error_message(json.loads(text))
            except ValueError:
                msg = text[:120]
            res.error = f"HTTP {resp.status_code}: {msg}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                res.error = f"stream error: {_error_message(chunk)}"
                return
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                res.output_tokens = int(usage.get("completion_tokens") or 0)
                details = usage.get("prompt_tokens_details")
                if isinstance(details, dict) and details.get("cached_tokens") is not None:
                    res.cached_tokens = int(details["cached_tokens"])
            # Every chunk carrying a choice marks a token step (as vLLM's client counts them);
            # usage-only chunks do not, nor announcements (see _is_token_step).
            if chunk.get("choices"):
                now = time.perf_counter()
                if first_choice is None:
                    first_choice = now
                if _is_token_step(chunk["choices"]):
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
                for c in chunk["choices"]:
                    if isinstance(c, dict) and c.get("index", 0) == 0:
                        piece = c["delta"].get("content") if isinstance(c.get("delta"), dict) else c.get("text")
                        pieces.append(piece or "")
                        if ids is not None:
                            ids = _logprob_token_ids(c.get("logprobs"), ids)
    res.e2el = time.perf_counter() - start
    if not done:
        res.error = "stream ended without [DONE]"
        return
    if last is None and first_choice is not None:  # announcements only (an answer that ended at once):
        res.ttft, chunks = first_choice - start, 1  # the step the server ran
    if last is None and first_choice is None:
        res.error = "no output"
        return
    if res.output_tokens == 0:  # a server that sends no usage: one token per chunk, the best estimate
        res.output_tokens = chunks
    res.text = "".join(pieces)
    # Ids that do not account for every output token were not really sent (no logprobs, say).
    res.token_ids = ids if ids is not None and len(ids) == res.output_tokens else None
    res.ok = True


_OUTPUT_FIELDS = ("text", "content", "reasoning_content", "reasoning", "tool_calls", "token_ids")


def _is_token_step(choices) -> bool:
    """Whether a chunk's choices mark a token step: not when every choice only announces (a chat
    stream's first delta {"role": "assistant", "content": ""}, sent before or with the first token)
    or only closes (no output, a finish_reason: OpenAI's last chunk). A chunk with no output and
    neither (tokenmill's empty delta for a step whose text is held back) is still a step."""
    if not isinstance(choices, list):
        return True
    for c in choices:
        if not isinstance(c, dict):
            return True
        delta = c.get("delta")
        fields = delta if isinstance(delta, dict) else c
        if any(fields.get(k) for k in _OUTPUT_FIELDS) or c.get("token_ids"):
            return True
        announces = isinstance(delta, dict) and "role" in delta
        if not announces and c.get("finish_reason") is None:
            return True
    return False


def _logprob_token_ids(lp, ids: list[int]) -> list[int] | None:
    """Appends the "token_id:N" tokens of a chunk's logprobs (completions or chat format) to ids;
    None once anything does not parse (the server ignored return_tokens_as_token_ids)."""
    if lp is None:
        return ids
    if not isinstance(lp, dict):
        return None
    tokens = lp.get("tokens")
    if tokens is None and "content" in lp:
        content = lp["content"] or []  # null: no tokens in this chunk
        tokens = [t.get("token") if isinstance(t, dict) else None for t in content] if isinstance(content, list) \
            else None
    if not isinstance(tokens, list):
        return None
    for t in tokens:
        if not (isinstance(t, str) and t.startswith("token_id:") and t[9:].isascii() and t[9:].isdecimal()):
            return None
        ids.append(int(t[9:]))
    return ids


Prompt = str | list[int] | list[dict]  # what one request sends: completions text or ids, or chat messages
Turn = tuple[Prompt | None, RequestResult]  # (None, failure) for a turn never sent


async def run_conversation(conv: Conversation, endpoint: str,
                           send: Callable[[Prompt, int], Awaitable[RequestResult]]) -> list[Turn]:
    """Sends the turns one after another: turn k carries turns 1..k-1 with the server's own answers
    and the new user message. A failed turn ends the conversation; its later turns count as failed."""
    turns: list[Turn] = []
    messages: list[dict] = []
    transcript = ""
    for k, (user, max_tokens) in enumerate(zip(conv.user_turns, conv.output_lens)):
        if endpoint == "chat":
            messages = [*messages, {"role": "user", "content": user}]
            prompt: Prompt = messages
        else:
            # A plain transcript needs no chat template; the answer goes in exactly as generated,
            # so each prompt extends the previous prompt + answer, as a cache would want.
            transcript += ("\n" if k else "") + f"User: {user}\nAssistant:"
            prompt = transcript
        res = await send(prompt, max_tokens)
        turns.append((prompt, res))
        if not res.ok:
            turns += [(None, RequestResult(error=f"not sent: turn {k + 1} failed"))
                      for _ in conv.user_turns[k + 1:]]
            break
        messages = [*messages, {"role": "assistant", "content": res.text}]
        transcript += res.text
    return turns


class _NoTokenize(Exception):
    pass


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def possible_reuse(http, base: str, model: str, endpoint: str, conversations: list[list[Turn]],
                         cached_tokens: int | None, concurrency: int = 8) -> dict:
    """How many prompt tokens a perfect prefix cache could have served: for each turn k > 1 whose
    turn k-1 completed, the longest common token prefix of its prompt and tokens(turn k-1's prompt)
    + turn k-1's answer ids (as generated, when the server returned them; else its text tokenized),
    capped at its length - 1 (the last prompt token is always computed).
    An upper bound: a server caches whole blocks, and the answer's last token never went through the
    model. Hits from other conversations (a shared chat-template header) are not counted as possible,
    so hit_rate_vs_possible can exceed 1. Tokenizes through /tokenize; without it, reported as unavailable."""
    import httpx

    async def tokenize(payload: dict) -> list[int]:
        r = await http.post(base + "/tokenize", json={"model": model, **payload})
        if r.status_code != 200:
            raise _NoTokenize(f"/tokenize answered HTTP {r.status_code}")
        data = r.json()
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list):
            raise _NoTokenize("/tokenize sent no token list")
        return tokens

    sem = asyncio.Semaphore(concurrency)

    async def conversation(turns: list[Turn]) -> tuple[int, int]:
        reuse, prompt_tokens, prev = 0, 0, None  # prev: ids of the previous prompt + its answer
        async with sem:
            for k, (prompt, res) in enumerate(turns):
                if not res.ok:
                    break
                ids = await tokenize({"messages": prompt} if endpoint == "chat" else {"prompt": prompt})
                prompt_tokens += len(ids)
                if prev is not None:
                    reuse += max(0, min(_common_prefix(prev, ids), len(ids) - 1))
                if k + 1 < len(turns):
                    # The answer as generated; retokenizing its text may give other ids, which a
                    # cache could never match, so the text is only the fallback.
                    answer = res.token_ids if res.token_ids is not None else await tokenize(
                        {"prompt": res.text, "add_special_tokens": False})
                    prev = ids + answer
        return reuse, prompt_tokens

    try:
        counts = await asyncio.gather(*(conversation(t) for t in conversations))
    except (_NoTokenize, httpx.HTTPError, ValueError) as e:  # ValueError: a body that is not JSON
        why = str(e) if isinstance(e, _NoTokenize) else f"{type(e).__name__}: {str(e)[:120]}"
        return {"possible_reuse_tokens": None, "possible_reuse_rate": None, "hit_rate_vs_possible": None,
                "possible_reuse_error": why}
    reuse, prompt_tokens = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {"possible_reuse_tokens": reuse,
            "possible_reuse_rate": reuse / prompt_tokens if prompt_tokens else None,
            "hit_rate_vs_possible": cached_tokens / reuse if cached_tokens is not None and reuse else None,
            "possible_reuse_error": None}


async def run_once(args: argparse.Namespace, reqs: list[Request] | list[Conversation], rate: float,
                   model: str | None = None, progress: bool = True, transport=None,
                   cache_salt: str | None = None) -> dict:
    """One run at one rate; transport (an httpx transport) replaces the network in tests. cache_salt:
    sent with every request (the field tokenmill and vLLM take), so that only requests with the
    same salt share prefix-cache blocks."""
    import httpx
    from tqdm import tqdm

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000, max_keepalive_connections=100)
    slo = parse_slo(args.slo)
    convs = [c for c in reqs if isinstance(c, Conversation)]
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout, transport=transport) as http:
        model = model or args.model or await _first_model(http, base)
        url = base + ("/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions")
        # --max-concurrency limits requests in flight; a conversation holds no slot between its turns.
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        schedule = arrival_times(len(reqs), rate, args.burstiness, args.seed)
        total = sum(len(c.user_turns) for c in convs) if convs else len(reqs)
        bar = tqdm(total=total, desc=f"rate {rate:g}", unit="req", leave=False, disable=not progress)

        async def send(prompt: Prompt, max_tokens: int, want_ids: bool = False) -> RequestResult:
            body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
                    "stream_options": {"include_usage": True}}
            body["messages" if args.endpoint == "chat" else "prompt"] = prompt
            if want_ids:  # the exact answer ids, for the possible-reuse yardstick (vLLM has the field too)
                body.update({"logprobs": True, "top_logprobs": 0} if args.endpoint == "chat" else {"logprobs": 0})
                body["return_tokens_as_token_ids"] = True
            if args.ignore_eos:
                body["ignore_eos"] = True
            if cache_salt is not None:
                body["cache_salt"] = cache_salt
            if sem is None:
                res = await _one(http, url, body, args.timeout)
            else:
                async with sem:
                    res = await _one(http, url, body, args.timeout)
            bar.update(1)
            return res

        async def single(r: Request, at: float, t0: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            chat = r.messages or [{"role": "user", "content": r.prompt}]
            return await send(chat if args.endpoint == "chat" else r.prompt, r.output_len)

        async def converse(c: Conversation, at: float, t0: float) -> list[Turn]:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            turns = await run_conversation(c, args.endpoint, lambda p, n: send(p, n, want_ids=args.answer_ids))
            bar.update(sum(p is None for p, _ in turns))
            return turns

        t0 = time.perf_counter()
        if convs:
            conversations = await asyncio.gather(*(converse(c, at, t0) for c, at in zip(convs, schedule)))
            results = [res for turns in conversations for _, res in turns]
        else:
            results = await asyncio.gather(*(single(r, at, t0) for r, at in zip(reqs, schedule)))
        duration = time.perf_counter() - t0
        bar.close()
        out = summarize(list(results), duration, slo, rate)
        out["dataset"] = args.dataset
        if convs:  # tokenizing after the clock stopped keeps it out of the timings
            out["num_conversations"], out["num_turns"] = len(convs), max(len(c.user_turns) for c in convs)
            out.update(await possible_reuse(http, base, model, args.endpoint, conversations, out["cached_tokens"]))
    out["model"] = model
    return out


def format_report(s: dict) -> str:
    lines = [
        f"{'=' * 20} serving benchmark (rate {s['request_rate']}) {'=' * 20}",
        f"{'completed requests:':<34}{s['completed']}",
        f"{'failed requests:':<34}{s['failed']}",
    ]
    for err, n in s["errors"].items():
        lines.append(f"    {n} x {err}")
    lines += [
        f"{'duration (s):':<34}{s['duration_s']:.2f}",
        f"{'total input tokens:':<34}{s['total_input_tokens']}",
        f"{'total output tokens:':<34}{s['total_output_tokens']}",
        f"{'request throughput (req/s):':<34}{s['request_throughput']:.3f}",
        f"{'input throughput (tok/s):':<34}{s['input_throughput']:.1f}",
        f"{'output throughput (tok/s):':<34}{s['output_throughput']:.1f}",
        f"{'goodput (req/s):':<34}{s['goodput']['request_rate']:.3f}"
        f"  ({s['goodput']['fraction']:.1%} of requests meet {s['goodput']['slo'] or 'no SLO'})",
        f"{'':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2el_ms", "E2E (ms)")):
        v = s[key]
        lines.append(f"{label:<14}{v['mean']:>10.1f}{v['median']:>10.1f}{v['p90']:>10.1f}{v['p99']:>10.1f}")
    if s["cached_tokens"] is None:
        lines.append(f"{'prefix cache hits:':<34}not reported by the server (usage.prompt_tokens_details)")
    else:
        lines.append(f"{'prefix cache hits (tokens):':<34}{s['cached_tokens']}  (hit rate "
                     f"{_pct(s['prefix_hit_rate'])} of prompt tokens)")
    if "possible_reuse_tokens" in s:
        lines.append(f"{'conversations x turns:':<34}{s['num_conversations']} x {s['num_turns']}")
        if s["possible_reuse_tokens"] is None:
            lines.append(f"{'possible reuse:':<34}unavailable ({s['possible_reuse_error']})")
        else:
            lines += [f"{'possible reuse (tokens):':<34}{s['possible_reuse_tokens']}  "
                      f"({_pct(s['possible_reuse_rate'])} of prompt tokens)",
                      f"{'hit rate vs possible:':<34}{_pct(s['hit_rate_vs_possible'])}"]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def plot_sweep(results: list[dict], plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    xs = [r["output_throughput"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency")):
        for stat, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [r[key][stat] for r in results], style, label=stat)
        ax.set_xlabel("achieved output throughput (tok/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    latency = os.path.join(plot_dir, "latency_vs_throughput.png")
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    offered = [r["offered_rate"] for r in results]
    finite = [o for o in offered if not math.isinf(o)]
    inf_x = (max(finite) * 1.5 if finite else 1.0)
    ox = [inf_x if math.isinf(o) else o for o in offered]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(ox, [r["goodput"]["request_rate"] for r in results], "o-", label="goodput")
    ax.plot(ox, [r["request_throughput"] for r in results], "s--", label="completed req/s")
    ax.set_xlabel("offered request rate (req/s)" + (f"; 'inf' drawn at {inf_x:g}" if any(map(math.isinf, offered))
                                                   else ""))
    ax.set_ylabel("requests/s")
    ax.set_title(f"goodput vs offered rate (SLO {results[0]['goodput']['slo'] or 'none'})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    good = os.path.join(plot_dir, "goodput_vs_rate.png")
    fig.savefig(good, dpi=110)
    plt.close(fig)
    return [latency, good]


def run(args: argparse.Namespace) -> dict | list[dict]:
    if args.plot_dir and not args.sweep:
        raise ValueError("--plot-dir needs --sweep")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.random_input_len < 1 or args.random_output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if args.output_range_ratio is not None and not 0 <= args.output_range_ratio < 1:
        raise ValueError(f"--output-range-ratio must be in [0, 1), got {args.output_range_ratio}")
    parse_slo(args.slo)  # fail on bad settings before sending anything
    if args.sweep:
        rates = sorted(_rate(x) for x in args.sweep.split(",") if x.strip())
        if not rates:
            raise ValueError("--sweep: give one or more rates, e.g. 1,2,4,inf")
    else:
        rates = [_rate(str(args.request_rate))]
    reqs = build_requests(args)
    if args.sweep:
        # Every rate sends the same prompts (the rates stay comparable), each under its own cache
        # salt: a later rate would otherwise find an earlier one's prompts in the prefix cache.
        # (Fresh per invocation, so that a second sweep against the same server starts cold too.)
        run_id = uuid.uuid4().hex[:12]
        results = []
        for i, rate in enumerate(rates):
            salt = f"tokenmill-bench-sweep-{run_id}-{i}" if args.cache_salt else None
            s = asyncio.run(run_once(args, reqs, rate, cache_salt=salt))
            s["offered_rate"] = rate
            s["cache_salt"] = salt
            print(format_report(s), flush=True)
            results.append(s)
            write_json(args.json, results)  # a failure later keeps these
        print(format_sweep(results))
        if args.plot_dir:
            for path in plot_sweep(results, args.plot_dir):
                print(f"wrote {path}")
        write_json(args.json, results)
        return results
    s = asyncio.run(run_once(args, reqs, rates[0]))
    print(format_report(s))
    write_json(args.json, s)
    return s


def format_sweep(results: list[dict]) -> str:
    """The sweep's one-line-per-rate table (hit: the prefix-cache hit rate the server reported)."""
    lines = [f"\n{'rate':>6} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
             f"{'TPOT p99':>9} {'E2E p50':>9} {'goodput':>8} {'failed':>6} {'hit':>6}"]
    for s in results:
        lines.append(f"{s['offered_rate']:>6g} {s['request_throughput']:>8.3f} {s['output_throughput']:>10.1f} "
                     f"{s['ttft_ms']['median']:>9.0f} {s['ttft_ms']['p99']:>9.0f} {s['tpot_ms']['median']:>9.0f} "
                     f"{s['tpot_ms']['p99']:>9.0f} {s['e2el_ms']['median']:>9.0f} "
                     f"{s['goodput']['request_rate']:>8.3f} {s['failed']:>6} {_pct(s['prefix_hit_rate']):>6}")
    return "\n".join(lines)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"request rate {text!r} is not a number or 'inf'") from None
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {text}")
    return rate
