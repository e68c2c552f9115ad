"""`tokenmill bench rag`: file_search's excerpts in score order against document order.

A RAG prompt is mostly its excerpts (here 4 chunks of 256 tokens against a question of 28 words),
so what the prefix cache can serve again decides its prefill. Questions that find the same
excerpts rarely rank them alike; in score order (best first, what RAG stacks send) their prompts
then differ from the first excerpt on and share nothing past the system prompt. In document order
(tokenmill's `excerpt_order: "document"`: by store, file and place in the file) the same excerpts
make the same prompt prefix whatever their scores, so its KV is served from the cache.

One server (a random SmolLM-135M-shaped model that generates, the same folder served again as
the embedding model, a synthetic word tokenizer), one vector store of --num-docs files, and
--num-requests streamed chat requests with a file_search tool. Each request asks about one of
--num-topics topics (Zipf-popular): the topic's words, which end the question and so steer its
last-token embedding, after words of its own. The same requests run in score order, then in
document order, each arm under its own cache_salt (so neither reuses the other's KV); printed
side by side: TTFT percentiles, prompt and cached tokens, and how often the same excerpts came
back in another order (what document order turns into cache hits). The salt covers the whole
request, the query's embedding included; a warm-up of a few requests (a salt of its own) runs
first, and score order always runs before document order.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import tempfile
import time

from tokenmill.bench import check_at_least, running_server, write_json
from tokenmill.bench.workload import make_random_model, save_synthetic_tokenizer
from tokenmill.stats import percentile, percentile_summary

SERVED, EMBED = "bench", "bench-embed"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
SYSTEM = "Answer from the excerpts."
ARMS = ("score", "document")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder; without config.json a random SmolLM-135M-shaped Llama is written "
                   "there (default: a temp dir), with a synthetic word tokenizer")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--num-docs", type=int, default=12, help="files in the vector store")
    p.add_argument("--doc-words", type=int, default=1024, help="words (tokens) per file")
    p.add_argument("--chunk-tokens", type=int, default=256, help="static chunking, no overlap")
    p.add_argument("--max-num-results", type=int, default=4, help="excerpts per request")
    p.add_argument("--num-topics", type=int, default=12)
    p.add_argument("--topic-words", type=int, default=24, help="words that end every question on a topic")
    p.add_argument("--question-words", type=int, default=4, help="each question's own words, before the topic's")
    p.add_argument("--zipf", type=float, default=1.1, help="topic popularity exponent")
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--output-len", type=int, default=16, help="tokens per answer (ignore_eos)")
    p.add_argument("--kv-cache-memory", type=float, default=2.0, metavar="GIB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all figures to this file")


def run(args: argparse.Namespace) -> dict:
    import httpx

    from tokenmill.server.serve import free_port

    for flag in ("num_docs", "doc_words", "chunk_tokens", "max_num_results", "num_topics", "topic_words",
                 "question_words", "num_requests", "max_concurrency", "output_len"):
        check_at_least("--" + flag.replace("_", "-"), getattr(args, flag))
    workdir = tempfile.mkdtemp(prefix="tokenmill-rag-")
    model = args.model or os.path.join(workdir, "model")
    make_random_model(model, seed=args.seed)
    with open(os.path.join(model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    save_synthetic_tokenizer(model, vocab_size, args.seed)
    words = _words(model)
    with open(os.path.join(workdir, "template.jinja"), "w") as f:
        f.write(TEMPLATE)
    with open(os.path.join(workdir, "models.yaml"), "w") as f:
        json.dump({"models": [{"name": SERVED, "path": model, "task": "generate"},
                              {"name": EMBED, "path": model, "task": "embed"}]}, f)  # (JSON is YAML)
    rng = random.Random(args.seed)
    docs = [" ".join(rng.choices(words, k=args.doc_words)) for _ in range(args.num_docs)]
    port = args.port or free_port()
    log = os.path.join(workdir, "server.log")
    cli = ["serve", "--models", os.path.join(workdir, "models.yaml"), "--port", str(port), "--dtype", "float32",
           "--kv-cache-memory", str(args.kv_cache_memory), "--chat-template", os.path.join(workdir, "template.jinja")]
    results: dict = {"model": model, "settings": {k: v for k, v in vars(args).items()
                                                  if k not in ("func", "command", "bench_command", "log_level")}}
    with running_server(cli, port, log, lambda: open(log).read()[-3000:]) as base:
        client = httpx.Client(base_url=base, timeout=600)
        vs_id = _store(client, docs, args.chunk_tokens)
        # Topics: the closing words of a chunk each, so that a topic's questions find that chunk's
        # neighbourhood; questions: words of their own, then the topic's.
        chunks = [x["text"] for f in client.get(f"/v1/vector_stores/{vs_id}/files").json()["data"]
                  for x in client.get(f"/v1/vector_stores/{vs_id}/files/{f['id']}/content").json()["data"]]
        topics = [" ".join(c.split()[-args.topic_words:]) for c in rng.sample(chunks, min(args.num_topics,
                                                                                          len(chunks)))]
        weights = [1 / (i + 1) ** args.zipf for i in range(len(topics))]
        questions = [" ".join(rng.choices(words, k=args.question_words)) + " " + rng.choices(topics, weights)[0]
                     for _ in range(args.num_requests)]
        # Warm-up (its own salt): the first requests of a server pay for its kernels' first runs.
        asyncio.run(_arm(base, vs_id, questions[:args.max_concurrency], "warm-up", args))
        for arm in ARMS:
            print(f"### excerpt_order {arm}: {len(questions)} requests, {args.max_concurrency} in flight", flush=True)
            results[arm] = asyncio.run(_arm(base, vs_id, questions, arm, args))
    results["reordered"] = _reordered(results["score"]["found"])
    for arm in ARMS:
        results[arm].pop("found")
    s, d = results["score"], results["document"]
    results["ratios"] = {"ttft_p50": s["ttft_ms"]["p50"] / d["ttft_ms"]["p50"],
                         "cached_fraction": d["cached_fraction"] / max(s["cached_fraction"], 1e-9)}
    print("\n" + format_table(results))
    write_json(args.json, results)
    return results


def _words(model: str) -> list[str]:
    """Words of the model's vocabulary that are one token each (the synthetic tokenizer's), else
    the datasets' English words (a real tokenizer's)."""
    from tokenizers import Tokenizer

    from tokenmill.bench.datasets import WORDS

    vocab = Tokenizer.from_file(os.path.join(model, "tokenizer.json")).get_vocab()
    found = [t[1:] for t in sorted(vocab, key=vocab.get) if t.startswith("\u0120") and t[1:].isalpha()][:4000]
    return found if len(found) >= 200 else list(WORDS)


def _store(client, docs: list[str], chunk_tokens: int) -> str:
    ids = []
    for i, d in enumerate(docs):
        r = client.post("/v1/files", files={"file": (f"doc{i:03d}.txt", io.BytesIO(d.encode()))},
                        data={"purpose": "assistants"})
        r.raise_for_status()
        ids.append(r.json()["id"])
    t0 = time.perf_counter()
    r = client.post("/v1/vector_stores", json={"name": "bench", "file_ids": ids, "embedding_model": EMBED,
                                               "chunking_strategy": {"type": "static", "static": {
                                                   "max_chunk_size_tokens": chunk_tokens,
                                                   "chunk_overlap_tokens": 0}}})
    r.raise_for_status()
    vs = r.json()
    while vs["status"] == "in_progress":
        time.sleep(0.1)
        vs = client.get(f"/v1/vector_stores/{vs['id']}").json()
    if vs["file_counts"]["completed"] != len(docs):
        raise RuntimeError(f"the vector store did not fill: {vs['file_counts']}")
    print(f"vector store: {len(docs)} files embedded in {time.perf_counter() - t0:.1f} s", flush=True)
    return vs["id"]


async def _arm(base: str, vs_id: str, questions: list[str], order: str, args: argparse.Namespace) -> dict:
    import httpx

    sem = asyncio.Semaphore(args.max_concurrency)
    tool = {"type": "file_search", "vector_store_ids": [vs_id], "max_num_results": args.max_num_results,
            "excerpt_order": order if order in ARMS else "score"}
    out: list[dict] = [{} for _ in questions]

    async def one(client: httpx.AsyncClient, i: int, q: str) -> None:
        body = {"model": SERVED, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                "tools": [tool], "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "cache_salt": f"bench-rag-{order}"}
        async with sem:
            t0 = time.perf_counter()
            ttft, usage, found = None, None, None
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: {r.status_code} {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if found is None and "file_search_call" in chunk:
                        found = [(x["file_id"], x["text"][:32]) for x in chunk["file_search_call"]["results"]]
                    if ttft is None and chunk.get("choices"):
                        ttft = time.perf_counter() - t0
                    usage = chunk.get("usage") or usage
            out[i] = {"ttft": ttft, "e2e": time.perf_counter() - t0, "prompt": usage["prompt_tokens"],
                      "cached": usage["prompt_tokens_details"]["cached_tokens"], "found": found}

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await asyncio.gather(*(one(client, i, q) for i, q in enumerate(questions)))
    wall = time.perf_counter() - t0
    prompt, cached = sum(r["prompt"] for r in out), sum(r["cached"] for r in out)
    return {"ttft_ms": percentile_summary([r["ttft"] for r in out], 1000),
            "e2e_ms_p50": percentile([r["e2e"] * 1000 for r in out], 50), "duration_s": wall,
            "requests_per_s": len(out) / wall, "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_fraction": cached / prompt, "mean_prompt_tokens": prompt / len(out),
            "found": [r["found"] for r in out]}


def _reordered(found: list[list]) -> dict:
    """How often a request found excerpts an earlier one found too: the same set (what document
    order caches), and among those, in the same order (what score order caches as well)."""
    seen: set[tuple] = set()
    seen_sets: set[frozenset] = set()
    same_set = same_order = 0
    for f in found:
        if frozenset(f) in seen_sets:
            same_set += 1
            same_order += tuple(f) in seen
        seen.add(tuple(f))
        seen_sets.add(frozenset(f))
    return {"requests": len(found), "same_set_as_earlier": same_set, "same_order_as_earlier": same_order}


def format_table(results: dict) -> str:
    s, d, ro = results["score"], results["document"], results["reordered"]
    rows = [("TTFT p50 (ms)", "ttft_ms", "p50"), ("TTFT p90 (ms)", "ttft_ms", "p90"),
            ("TTFT p99 (ms)", "ttft_ms", "p99"), ("E2E p50 (ms)", "e2e_ms_p50", None),
            ("requests/s", "requests_per_s", None), ("mean prompt tokens", "mean_prompt_tokens", None),
            ("cached / prompt tokens", "cached_fraction", None)]
    lines = [f"{'':26s} {'score order':>14s} {'document order':>16s} {'score/document':>16s}"]
    for label, key, sub in rows:
        a, b = (s[key][sub], d[key][sub]) if sub else (s[key], d[key])
        fmt = "{:.1%}" if key == "cached_fraction" else "{:,.1f}"
        lines.append(f"{label:26s} {fmt.format(a):>14s} {fmt.format(b):>16s} {a / b if b else float('inf'):>16.2f}")
    lines.append(f"requests whose excerpts an earlier request found: {ro['same_set_as_earlier']} of "
                 f"{ro['requests']} ({ro['same_order_as_earlier']} of them in the same order)")
    return "\n".join(lines)
