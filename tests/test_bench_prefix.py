"""bench serve's prefix-cache workloads: the shared-prefix and multi-turn datasets, the multi-turn
conversation flow and the hit-rate / possible-reuse arithmetic against a fake server, and short
runs against a real tokenmill server (hit-rate values are the server's business, not checked)."""

from __future__ import annotations

import asyncio
import json
import statistics

import httpx
import pytest

from tests.server_utils import ServerProcess
from tokenmill.bench.datasets import WORDS, multi_turn_conversations, shared_prefix_requests
from tokenmill.bench.serve_load import build_requests, format_report, run, run_once
from tokenmill.cli import build_parser


def _args(base_url: str, *extra: str):
    return build_parser().parse_args(["bench", "serve", "--base-url", base_url, *extra])


def _word_tokenizer():
    """A word-level tokenizer that knows every word the datasets write (lower and capitalized)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0}
    for w in [*WORDS, *(w.capitalize() for w in WORDS), ".", ":"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return tok


# -- datasets (no server) -----------------------------------------------------------------------
def test_shared_prefix_requests_share_k_prefixes():
    reqs = shared_prefix_requests(60, num_prefixes=3, prefix_len=200, question_len=20, output_len=8,
                                  range_ratio=0.0, seed=1)
    prefixes = [r.messages[0]["content"] for r in reqs]
    assert len(set(prefixes)) == 3
    assert all(p == prefixes[i % 3] for i, p in enumerate(prefixes))  # round-robin: each used equally
    questions = [r.messages[1]["content"] for r in reqs]
    assert len(set(questions)) == 60
    for r in reqs:
        assert [m["role"] for m in r.messages] == ["system", "user"]
        assert r.prompt == f"{r.messages[0]['content']}\n\n{r.messages[1]['content']}"
        assert len(r.messages[0]["content"].split()) == 200 and len(r.messages[1]["content"].split()) == 20
        assert r.prompt_len == 220 and r.output_len == 8
    # Close to the asked lengths for a word-level tokenizer (sentence ends add a '.' token).
    tok = _word_tokenizer()
    n_prefix = len(tok.encode(prefixes[0]).ids)
    n_question = statistics.mean(len(tok.encode(q).ids) for q in questions)
    assert 200 <= n_prefix <= 220 and 20 <= n_question <= 24
    assert 0 not in tok.encode(reqs[5].prompt).ids  # no <unk>: every word is a vocabulary word
    # Seeded.
    again = shared_prefix_requests(60, 3, 200, 20, 8, 0.0, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    assert shared_prefix_requests(60, 3, 200, 20, 8, 0.0, seed=2)[0].prompt != reqs[0].prompt


def test_shared_prefix_token_ids_and_length_ranges():
    reqs = shared_prefix_requests(40, 2, 64, 16, 10, 0.5, seed=0, vocab=1000)
    assert len({tuple(r.prompt[:64]) for r in reqs}) == 2
    assert all(r.prompt[:64] == reqs[i % 2].prompt[:64] for i, r in enumerate(reqs))
    assert all(len(r.prompt) == r.prompt_len and 64 + 8 <= len(r.prompt) <= 64 + 24 for r in reqs)
    assert all(5 <= r.output_len <= 15 for r in reqs) and len({r.output_len for r in reqs}) > 1
    assert all(r.messages is None for r in reqs)
    with pytest.raises(ValueError, match="--num-prefixes"):
        shared_prefix_requests(4, 0, 64, 16, 10, 0.0, seed=0)


def test_multi_turn_conversations_and_flags(tmp_path):
    convs = multi_turn_conversations(5, num_turns=3, turn_len=30, output_len=12, range_ratio=0.0, seed=0)
    assert len(convs) == 5 and all(len(c.user_turns) == 3 and c.output_lens == [12] * 3 for c in convs)
    assert all(len(t.split()) == 30 for c in convs for t in c.user_turns)
    assert len({t for c in convs for t in c.user_turns}) == 15
    assert multi_turn_conversations(5, 3, 30, 12, 0.0, seed=0) == convs
    # Through the flags: --num-prompts counts conversations; --word-list replaces the English words.
    words = tmp_path / "words.txt"
    words.write_text("zork\nblat quux\n")
    convs = build_requests(_args("http://x", "--dataset", "multi-turn", "--num-prompts", "2", "--num-turns", "5",
                                 "--turn-len", "7", "--word-list", str(words)))
    assert len(convs) == 2 and len(convs[0].user_turns) == 5
    assert set(convs[0].user_turns[0].lower().replace(".", "").split()) <= {"zork", "blat", "quux"}
    reqs = build_requests(_args("http://x", "--dataset", "shared-prefix", "--num-prompts", "3", "--prefix-len", "9",
                                "--random-token-ids", "--vocab-size", "50"))
    assert all(len(r.prompt) == 9 + 64 for r in reqs)
    for extra in (["--dataset", "multi-turn", "--random-token-ids"],
                  ["--dataset", "shared-prefix", "--random-token-ids", "--endpoint", "chat"],
                  ["--dataset", "multi-turn", "--num-turns", "0"]):
        with pytest.raises(ValueError):
            run(_args("http://127.0.0.1:9", *extra))


# -- the multi-turn flow against a fake server ---------------------------------------------------
class FakeServer:
    """A streaming OpenAI-ish server with a whitespace tokenizer and a 4-token-block prefix cache:
    each answer is unique, so a turn that contains it was sent after it arrived."""

    def __init__(self, endpoint: str, tokenize: bool = True, cached: bool = True, fail_on: int | None = None,
                 answer_ids: bool = False):
        self.endpoint, self.tokenize_ok, self.cached, self.fail_on = endpoint, tokenize, cached, fail_on
        # answer_ids: send the answer's "generated" ids as logprob tokens, ids that its text does
        # not tokenize back to (as with a model whose output does not round-trip).
        self.answer_ids = answer_ids
        self.vocab: dict[str, int] = {}
        self.seen: list[list[int]] = []  # prompt ids, in arrival order
        self.requests: list[dict] = []  # bodies with their answers
        self.in_flight = self.max_in_flight = 0

    def ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def prompt_ids(self, body: dict) -> list[int]:
        if "messages" in body:
            return [t for m in body["messages"] for t in self.ids(f"{m['role']}: {m['content']}")]
        return self.ids(body["prompt"])

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if request.url.path == "/tokenize":
            if not self.tokenize_ok:
                return httpx.Response(404, json={"detail": "Not Found"})
            ids = self.prompt_ids(body) if "messages" in body else self.ids(body["prompt"])
            return httpx.Response(200, json={"tokens": ids, "count": len(ids)})
        n = len(self.requests)
        if n == self.fail_on:
            self.requests.append({**body, "answer": None})
            return httpx.Response(500, json={"error": {"message": "boom"}})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        ids = self.prompt_ids(body)
        hit = min(max((_lcp(ids, old) for old in self.seen), default=0), len(ids) - 1) // 4 * 4
        self.seen.append(ids)
        pieces = [f" answer{n}", f" w{n}a", f" w{n}b"]
        self.requests.append({**body, "answer": "".join(pieces), "prompt_tokens": len(ids), "cached": hit})
        usage = {"prompt_tokens": len(ids), "completion_tokens": 3}
        if self.cached:
            usage["prompt_tokens_details"] = {"cached_tokens": hit}
        want_ids = self.answer_ids and body.get("return_tokens_as_token_ids")

        def lp(i: int) -> dict | None:
            if not want_ids:
                return None
            tok = f"token_id:{10_000 + 3 * n + i}"
            return {"content": [{"token": tok, "logprob": 0.0}]} if self.endpoint == "chat" else {"tokens": [tok]}

        if self.endpoint == "chat":
            chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
            chunks += [{"choices": [{"index": 0, "delta": {"content": p}, "logprobs": lp(i)}]}
                       for i, p in enumerate(pieces)]
        else:
            chunks = [{"choices": [{"index": 0, "text": p, "logprobs": lp(i)}]} for i, p in enumerate(pieces)]
        chunks.append({"choices": [], "usage": usage})
        data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=data.encode())


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fake_run(fake: FakeServer, *extra: str) -> dict:
    args = _args("http://fake", "--model", "m", "--endpoint", fake.endpoint, "--dataset", "multi-turn",
                 "--num-prompts", "4", "--num-turns", "3", "--turn-len", "6", "--random-output-len", "3", *extra)
    return asyncio.run(run_once(args, build_requests(args), float("inf"), progress=False,
                                transport=httpx.MockTransport(fake)))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_multi_turn_resends_the_real_answers_in_order(endpoint):
    fake = FakeServer(endpoint)
    s = _fake_run(fake, "--max-concurrency", "2")
    assert s["completed"] == 12 and s["failed"] == 0
    assert s["num_conversations"] == 4 and s["num_turns"] == 3
    assert 1 < fake.max_in_flight <= 2  # conversations overlap; requests in flight are limited
    # Group the requests by conversation (its first user message) and check each turn's history.
    convs: dict[str, list[dict]] = {}
    for body in fake.requests:
        first = body["messages"][0]["content"] if endpoint == "chat" else body["prompt"].split("\n")[0]
        convs.setdefault(first, []).append(body)
    assert len(convs) == 4 and all(len(turns) == 3 for turns in convs.values())
    for turns in convs.values():
        for prev, cur in zip(turns, turns[1:]):
            if endpoint == "chat":
                assert cur["messages"][:-2] == prev["messages"]
                assert cur["messages"][-2] == {"role": "assistant", "content": prev["answer"]}
                assert cur["messages"][-1]["role"] == "user"
            else:
                assert cur["prompt"].startswith(prev["prompt"] + prev["answer"] + "\nUser: ")
                assert cur["prompt"].endswith("\nAssistant:")
        if endpoint == "completions":
            assert turns[0]["prompt"].startswith("User: ") and turns[0]["prompt"].endswith("\nAssistant:")
    # Hit rate from usage, and possible reuse recomputed here from the bodies.
    prompt_tokens = sum(b["prompt_tokens"] for b in fake.requests)
    cached = sum(b["cached"] for b in fake.requests)
    assert s["cached_tokens"] == cached > 0
    assert s["prefix_hit_rate"] == pytest.approx(cached / prompt_tokens)
    possible = 0
    for turns in convs.values():
        for prev, cur in zip(turns, turns[1:]):
            before = fake.prompt_ids(prev) + fake.ids(prev["answer"])
            ids = fake.prompt_ids(cur)
            possible += min(_lcp(before, ids), len(ids) - 1)
    # Completions: the whole previous prompt + answer is reusable; chat (this fake's template puts
    # 'assistant:' before the answer): the previous prompt.
    assert possible == sum(len(fake.prompt_ids(p)) + (3 if endpoint == "completions" else 0)
                           for turns in convs.values() for p in turns[:-1])
    assert s["possible_reuse_tokens"] == possible
    assert s["possible_reuse_rate"] == pytest.approx(possible / prompt_tokens)
    assert s["hit_rate_vs_possible"] == pytest.approx(cached / possible)
    assert s["possible_reuse_error"] is None
    report = format_report(s)
    assert "possible reuse (tokens):" in report and "hit rate vs possible:" in report


def test_multi_turn_without_tokenize_or_cached_tokens_reports_unknown():
    fake = FakeServer("completions", tokenize=False, cached=False)
    s = _fake_run(fake)
    assert s["completed"] == 12
    assert s["cached_tokens"] is None and s["prefix_hit_rate"] is None
    assert s["possible_reuse_tokens"] is None and s["hit_rate_vs_possible"] is None
    assert "HTTP 404" in s["possible_reuse_error"]
    report = format_report(s)
    assert "not reported by the server" in report and "unavailable (/tokenize answered HTTP 404)" in report
    # /tokenize present but no cached_tokens: the possible reuse is known, the ratio is not.
    s = _fake_run(FakeServer("completions", cached=False))
    assert s["possible_reuse_tokens"] > 0 and s["hit_rate_vs_possible"] is None


def test_a_failed_turn_ends_its_conversation():
    fake = FakeServer("completions", fail_on=0)  # the very first request: conversation 1, turn 1
    s = _fake_run(fake, "--max-concurrency", "1")
    assert s["failed"] == 3 and s["completed"] == 9
    assert s["errors"] == {"HTTP 500: boom": 1, "not sent: turn 1 failed": 2}
    assert len(fake.requests) == 10  # the two later turns were never sent
    assert s["possible_reuse_tokens"] > 0


# -- against a real server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.03", "--log-level", "warning",
                        log_path=str(tmp_path_factory.mktemp("bench-prefix") / "server.log"))
    yield srv
    assert srv.stop() == 0


def _check_cache_keys(s: dict) -> None:
    assert {"cached_tokens", "prefix_hit_rate"} <= set(s)
    if s["cached_tokens"] is not None:  # the server side lands separately: values are not checked
        assert 0 <= s["cached_tokens"] <= s["total_input_tokens"]


def test_shared_prefix_against_a_server(server, tmp_path):
    out = tmp_path / "r.json"
    s = run(_args(server.base_url, "--dataset", "shared-prefix", "--num-prompts", "8", "--num-prefixes", "2",
                  "--prefix-len", "40", "--question-len", "8", "--random-output-len", "4", "--ignore-eos",
                  "--max-concurrency", "4", "--json", str(out)))
    assert s["completed"] == 8 and s["failed"] == 0 and s["total_output_tokens"] == 32
    _check_cache_keys(s)
    saved = json.loads(out.read_text())
    assert {"cached_tokens", "prefix_hit_rate", "dataset"} <= set(saved) and saved["dataset"] == "shared-prefix"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_multi_turn_against_a_server(server, endpoint):
    s = run(_args(server.base_url, "--dataset", "multi-turn", "--endpoint", endpoint, "--num-prompts", "3",
                  "--num-turns", "3", "--turn-len", "10", "--random-output-len", "5", "--ignore-eos",
                  "--max-concurrency", "2"))
    assert s["completed"] == 9 and s["failed"] == 0
    _check_cache_keys(s)
    # /tokenize exists here, so the possible reuse is always known (it is computed client-side).
    assert s["possible_reuse_error"] is None
    assert s["possible_reuse_tokens"] > 0 and 0 < s["possible_reuse_rate"] < 1


def test_prefix_cache_command(model_dir, tmp_path, capsys):
    from tokenmill.bench.prefix_cache import run as prefix_cache_run

    out = tmp_path / "pc.json"
    args = build_parser().parse_args([
        "bench", "prefix-cache", "--model", model_dir, "--kv-cache-memory", "0.03", "--max-concurrency", "4",
        "--num-prompts", "6", "--prefix-len", "40", "--question-len", "6", "--output-len", "3",
        "--num-conversations", "2", "--num-turns", "2", "--turn-len", "6", "--json", str(out)])
    results = prefix_cache_run(args)
    saved = json.loads(out.read_text())
    for name in ("shared_prefix", "multi_turn"):
        for mode in ("on", "off"):
            assert results[name][mode]["failed"] == 0
            assert {"cached_tokens", "prefix_hit_rate", "server_hit_rate"} <= set(saved[name][mode])
        assert {"ttft_p50_ratio_off_on", "ttft_p99_ratio_off_on", "output_throughput_ratio_on_off"} <= set(saved[name])
    assert "possible_reuse_tokens" in saved["multi_turn"]["on"]
    for name in ("shared_prefix", "multi_turn"):  # the server caches with it on, never with it off
        on, off = saved[name]["on"], saved[name]["off"]
        assert on["prefix_hit_rate"] > 0 and on["server_hit_rate"] == pytest.approx(on["prefix_hit_rate"])
        assert off["prefix_hit_rate"] == 0 and off["cached_tokens"] == 0
    assert saved["multi_turn"]["on"]["hit_rate_vs_possible"] > 0.5
    table = capsys.readouterr().out
    assert "prefix caching on vs off" in table and "hit rate vs possible" in table


def test_possible_reuse_uses_the_generated_ids_when_the_server_sends_them():
    """An answer whose text tokenizes to other ids than were generated cannot come from a cache:
    with the ids (logprobs + return_tokens_as_token_ids), possible reuse stops at the answer."""
    fake = FakeServer("completions", answer_ids=True)
    s = _fake_run(fake)
    assert all(b["return_tokens_as_token_ids"] and b["logprobs"] == 0 for b in fake.requests)
    convs: dict[str, list[dict]] = {}
    for body in fake.requests:
        convs.setdefault(body["prompt"].split("\n")[0], []).append(body)
    possible = sum(len(fake.prompt_ids(p)) for turns in convs.values() for p in turns[:-1])
    assert s["possible_reuse_tokens"] == possible


def test_no_answer_ids_sends_plain_requests_and_bad_output_range_is_refused():
    fake = FakeServer("chat", answer_ids=True)
    s = _fake_run(fake, "--no-answer-ids")
    assert s["failed"] == 0
    assert not any("return_tokens_as_token_ids" in b or "logprobs" in b for b in fake.requests)
    with pytest.raises(ValueError, match="--output-range-ratio"):
        run(_args("http://fake", "--dataset", "multi-turn", "--output-range-ratio", "1.5"))
