"""Tenants (issue 15): keys, limits, models, the per-tenant prefix cache. The limiter's rules with a
fake clock first, then a real server (`--tenants`) driven by the openai client, 32 at a time."""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml

from tests.models import make_model
from tests.server_utils import ROOT, ServerProcess
from tokenmill.ops.tenants import (
    LimitExceeded,
    RequestTooLarge,
    SlidingWindow,
    Tenants,
    hash_key,
    load_tenants,
    parse_tenants,
)
from tokenmill.outputs import CompletionOutput, RequestOutput

# -- the limiter, with a fake clock ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def tenants(clock: Clock, **limits) -> tuple[Tenants, object]:
    cfg = parse_tenants({"tenants": [{"name": "acme", "keys_sha256": [hash_key("k")], **limits}]})
    t = Tenants(cfg, clock=clock)
    return t, cfg.tenants[0]


def output(rid: str, generated: int, finished: bool) -> RequestOutput:
    c = CompletionOutput(0, "", list(range(generated)), None, None, "length" if finished else None)
    return RequestOutput(rid, None, [1, 2], None, [c], finished=finished)


def test_sliding_window_counts_the_last_span_not_fixed_buckets():
    w = SlidingWindow(60)
    for t in (0, 10, 20):
        w.add(t, 1)
    w.prune(59.9)
    assert w.total == 3
    assert w.wait(59.9, 1, 3) == pytest.approx(0.1)  # the entry at 0 leaves at 60
    assert w.wait(59.9, 2, 3) == pytest.approx(10.1)  # two must leave: the one at 10 too
    w.prune(60)
    assert w.total == 2 and len(w) == 2
    assert w.wait(60, 1, 3) == 0
    e = w.add(60, 5)
    w.set(e, 2)
    assert w.total == 4
    w.prune(120)
    assert w.total == 0
    w.set(e, 7)  # gone from the window: changing it counts for nothing
    assert w.total == 0


def test_requests_per_minute_slides():
    clock = Clock()
    lim, acme = tenants(clock, requests_per_minute=3)
    for _ in range(3):  # at 0, 10 and 20 s
        lim.admit(acme).release()
        clock.t += 10
    # 30 s after the first
    with pytest.raises(LimitExceeded) as e:
        lim.admit(acme)
    assert e.value.limit == "requests_per_minute" and e.value.retry_after == pytest.approx(30)
    assert e.value.retry_after_s == 30
    assert e.value.message == "tenant acme: requests_per_minute limit 3 reached; retry in 30 s"
    clock.t += 30  # the first one left the window; the next two still count
    lim.admit(acme)
    clock.t += 1
    with pytest.raises(LimitExceeded) as e:
        lim.admit(acme)
    assert e.value.retry_after == pytest.approx(9)  # the one admitted 10 s after the first leaves next


def test_concurrency_is_held_until_release_and_released_once():
    clock = Clock()
    lim, acme = tenants(clock, max_concurrent_requests=2)
    a, b = lim.admit(acme), lim.admit(acme)
    with pytest.raises(LimitExceeded) as e:
        lim.admit(acme)
    assert e.value.limit == "concurrent_requests" and e.value.retry_after_s == 1
    assert "max_concurrent_requests limit 2 reached" in e.value.message
    a.release()
    a.release()  # idempotent: a second release must not free a slot it does not hold
    assert lim.in_flight() == {"acme": 1}
    c = lim.admit(acme)
    with pytest.raises(LimitExceeded):
        lim.admit(acme)
    b.release()
    c.release()
    assert lim.in_flight() == {"acme": 0}


def test_tokens_are_reserved_then_settled_to_what_was_used():
    clock = Clock()
    lim, acme = tenants(clock, tokens_per_minute=100, requests_per_minute=10)
    a = lim.admit(acme)
    a.reserve(2, 60)  # prompt 2 + up to 58 generated
    a.track(["a"])
    b = lim.admit(acme)
    with pytest.raises(LimitExceeded) as e:
        b.reserve(2, 50)
    assert e.value.limit == "tokens_per_minute" and e.value.retry_after == pytest.approx(60)
    assert "tokens_per_minute limit 100 reached" in e.value.message
    b.release()
    # b was refused: it does not count as a request either (10 per minute: 9 more fit, not 8)
    assert lim.states["acme"].requests.total == 1
    lim.observe(output("a", 20, False))
    assert lim.states["acme"].tokens.total == 60  # running: still its reservation
    a.release()
    assert lim.states["acme"].tokens.total == 22  # ended (the client left): what it used so far
    lim.observe(output("a", 25, True))  # the abort's last output, after the response ended
    assert lim.states["acme"].tokens.total == 27
    lim.observe(output("a", 40, True))  # untracked once finished: later outputs are not its
    assert lim.states["acme"].tokens.total == 27
    c = lim.admit(acme)
    c.reserve(2, 73)  # 27 + 73 = 100 fits exactly
    c.release()
    d = lim.admit(acme)
    with pytest.raises(RequestTooLarge, match="more than its tokens_per_minute limit 100"):
        d.reserve(10, 101)
    d.release()
    clock.t += 60  # everything above left the window
    e2 = lim.admit(acme)
    e2.reserve(0, 100)
    e2.release()
    assert not lim._by_rid


def test_a_refused_add_uses_nothing_and_stale_tracking_is_dropped():
    clock = Clock()
    lim, acme = tenants(clock, tokens_per_minute=100)
    a = lim.admit(acme)
    a.reserve(5, 90)
    a.track(["x"])
    a.cancel_reservation()  # the engine refused it
    assert lim.states["acme"].tokens.total == 0 and not lim._by_rid
    a.release()
    b = lim.admit(acme)
    b.reserve(5, 50)
    b.track(["y"])
    b.release()  # its engine request never reported finishing (an engine that died)
    assert "y" in lim._by_rid
    clock.t += 61
    c = lim.admit(acme)
    c.reserve(1, 1)
    assert "y" not in lim._by_rid  # its reservation left the window: no more tracking
    c.release()


def test_refused_requests_leave_nothing_in_the_windows():
    """A request refused after its admission (by tokens_per_minute, or, at a fleet router, by
    every replica) is taken out of the windows, not kept at 0: `wait` walks the window on every
    refusal, and a client sending refused requests must not make that walk long."""
    clock = Clock()
    lim, acme = tenants(clock, requests_per_minute=5, tokens_per_minute=100)
    keep = lim.admit(acme)
    keep.reserve(5, 90)
    for _ in range(1000):
        a = lim.admit(acme)
        with pytest.raises(LimitExceeded, match="tokens_per_minute"):
            a.reserve(5, 50)  # (refunds its request itself)
        a.release()
        b = lim.admit(acme)
        b.refund_request()  # (a router: no replica admitted it)
        b.refund_request()  # (twice is once)
        b.release()
        c = lim.admit(acme)
        c.reserve(1, 5)
        c.cancel_reservation()
        c.refund_request()
        c.release()
    s = lim.states["acme"]
    assert len(s.requests) == 1 and s.requests.total == 1 and len(s.tokens) == 1 and s.tokens.total == 90


def test_keys_are_compared_in_constant_time_against_every_hash(monkeypatch):
    cfg = parse_tenants({"tenants": [{"name": "a", "keys_sha256": [hash_key("ka1"), hash_key("ka2")]},
                                     {"name": "b", "keys_sha256": [hash_key("kb").upper()]}]})
    lim = Tenants(cfg)
    import tokenmill.ops.tenants as mod

    calls = []
    real = mod.hmac.compare_digest

    def counting(x, y):
        calls.append((x, y))
        return real(x, y)

    monkeypatch.setattr(mod.hmac, "compare_digest", counting)
    assert lim.authenticate("Bearer ka1").name == "a"
    assert len(calls) == 3  # no early exit on the first match
    assert all(x == hashlib.sha256(b"ka1").digest() for x, _ in calls)  # the hash is compared, never the key
    assert lim.authenticate("Bearer kb").name == "b"
    assert lim.authenticate("bearer ka2").name == "a"
    for header in (None, "", "Bearer ", "Bearer nope", "Basic ka1", "ka1"):
        assert lim.authenticate(header) is None


@pytest.mark.parametrize("doc, message", [
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32], "rate": 1}]}, "tenants[0] (a).rate: unknown key"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32], "slo_class": "gold"}],
      "slo_classes": {"silver": {}}}, "slo_class: 'gold' is not a class in slo_classes (silver)"),
    ({"tenants": [{"name": "a", "keys_sha256": ["ab" * 32]}, {"name": "b", "keys_sha256": ["AB" * 32]}]},
     "tenants[1].keys_sha256: abababababab... is also a key of tenant 'a'"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32], "requests_per_minute": 0}]},
     "requests_per_minute: a positive integer"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32], "tokens_per_minute": 1.5}]}, "tokens_per_minute"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32], "max_tokens": True}]}, "max_tokens"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32], "priority": "high"}]}, "priority: an integer"),
    ({"tenants": [{"name": "a", "keys_sha256": ["sk-plaintext"]}]}, "keys_sha256[0]: not a sha256 digest"),
    ({"tenants": [{"name": "a", "keys_sha256": []}]}, "keys_sha256: a non-empty list"),
    ({"tenants": [{"name": "a b", "keys_sha256": ["00" * 32]}]}, "tenants[0].name"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32]}, {"name": "a", "keys_sha256": ["01" * 32]}]},
     "'a' names two tenants"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32], "models": []}]}, "models: a non-empty list"),
    ({"tenants": []}, "tenants: a non-empty list"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32]}], "extra": 1}, "extra: unknown key"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32]}], "slo_classes": {"i": {"ttft": 5}}},
     "slo_classes.i.ttft: unknown key"),
    ({"tenants": [{"name": "a", "keys_sha256": ["00" * 32]}], "slo_classes": {"i": {"ttft_ms": -5}}},
     "slo_classes.i.ttft_ms: must be a positive number"),
])
def test_tenants_file_is_validated_strictly(doc, message):
    with pytest.raises(ValueError) as e:
        parse_tenants(doc)
    assert message in str(e.value)


def test_tenants_file_is_read(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text("slo_classes:\n  interactive: {ttft_ms: 800, tpot_ms: 150}\n  batch: {}\n"
                    f"tenants:\n  - name: acme\n    keys_sha256: [{hash_key('k')}]\n    priority: 1\n"
                    "    slo_class: interactive\n    models: [m]\n  - name: bulk\n"
                    f"    keys_sha256: [{hash_key('j')}]\n    slo_class: batch\n")
    cfg = load_tenants(str(path))
    acme, bulk = cfg.tenants
    assert acme.slo.ttft_s == 0.8 and acme.slo.tpot_s == 0.15 and acme.slo.slo_class == "interactive"
    assert acme.priority == 1 and acme.models == ("m",) and acme.allows("m") and not acme.allows("n")
    assert bulk.slo.best_effort and bulk.models is None and bulk.allows("anything")
    path.write_text("tenants: [")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_tenants(str(path))


def test_hash_key_command(monkeypatch, capsys):
    from tokenmill.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("sk-secret\n"))
    assert main(["tenants", "hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"sk-secret").hexdigest()


# -- a real server --------------------------------------------------------------------------------

SLOW_SEED = 4242  # steps with a request seeded so sleep (tests/fault_server.py): it stays in flight
POISON_SEED = 666  # fails in the engine
KEYS = {name: f"sk-{name}-key" for name in ("open", "other", "rpm", "tpm", "conc", "capped", "release", "settle",
                                            "cascade")}
TENANTS = {
    "slo_classes": {"interactive": {"ttft_ms": 800, "tpot_ms": 150}, "batch": {}},
    "tenants": [
        {"name": "open"}, {"name": "other", "slo_class": "batch"},
        {"name": "rpm", "requests_per_minute": 10},
        {"name": "tpm", "tokens_per_minute": 1000},
        {"name": "conc", "max_concurrent_requests": 3},
        {"name": "capped", "max_tokens": 8, "models": ["tier-a"], "slo_class": "interactive", "priority": 2},
        {"name": "release", "max_concurrent_requests": 2, "tokens_per_minute": 100000},
        {"name": "settle", "tokens_per_minute": 700},
        {"name": "cascade", "tokens_per_minute": 1000},
    ],
}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    doc = {**TENANTS, "tenants": [{**t, "keys_sha256": [hash_key(KEYS[t["name"]])]} for t in TENANTS["tenants"]]}
    (d / "tenants.yaml").write_text(yaml.safe_dump(doc))
    strong = make_model(str(d / "strong"), "llama", seed=1)
    (d / "models.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "llama", "path": model_dir}, {"name": "strong", "path": strong}],
        "tiers": [{"name": "tier-a", "route": {"policy": "rules", "default": "llama"}},
                  # (a random model is never this sure of a token: every answer escalates)
                  {"name": "tier-c", "route": {"policy": "cascade", "small": "llama", "strong": "strong",
                                               "threshold": -0.0001, "window": 4}}]}))
    srv = ServerProcess(None, "--models", str(d / "models.yaml"), "--tenants", str(d / "tenants.yaml"),
                        "--kv-cache-memory", "0.02", log_path=str(d / "server.log"), script="tests/fault_server.py",
                        env={"TOKENMILL_FAULT_SLOW_SEED": str(SLOW_SEED), "TOKENMILL_FAULT_SLOW_S": "0.05"})
    yield srv
    assert srv.stop() == 0


def api(server, tenant: str | None, key: str | None = None, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key or KEYS[tenant], max_retries=0,
                         timeout=timeout)


def in_flight(server, tenant: str) -> float:
    return server.metrics().get(f'tokenmill:tenant_requests_in_flight{{tenant="{tenant}"}}', math.nan)


def rejected(server, tenant: str, limit: str) -> float:
    return server.metrics()[f'tokenmill:tenant_rejected_requests_total{{limit="{limit}",tenant="{tenant}"}}']


def message(e: openai.APIStatusError) -> str:
    return e.body["message"]


def hammer(n: int, fn) -> list:
    """fn(i) from n threads released together; each result or the exception it raised."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            return fn(i)
        except Exception as e:  # the test sorts them
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_unknown_or_missing_key_is_401_and_a_known_key_works(server):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/embeddings", {"input": "hi"})):
        for headers in ({}, {"Authorization": "Bearer sk-nobody"}, {"Authorization": f"Basic {KEYS['open']}"}):
            r = httpx.post(server.base_url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as e:
        api(server, None, "sk-nobody").completions.create(model="llama", prompt="hi", max_tokens=1)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        api(server, None, "sk-nobody").models.list()
    r = api(server, "open").completions.create(model="llama", prompt="hi", max_tokens=3,
                                              extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    # The admin routes need --admin-api-key: a tenant's key (or none) does not unload models.
    r = httpx.post(server.base_url + "/v1/models/llama/unload", headers={"Authorization": f"Bearer {KEYS['open']}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    r = httpx.get(server.base_url + "/v1/kv_events", headers={"Authorization": f"Bearer {KEYS['open']}"})
    assert r.status_code == 403
    m = server.metrics()
    assert m['tokenmill:request_success_total{finished_reason="length",model_name="llama",tenant="open"}'] >= 1
    assert 'tokenmill:generation_tokens_total{model_name="llama",tenant="open"}' in m
    assert "tenant=open prompt_tokens=" in server.log()


def test_models_cap_and_listing(server):
    capped = api(server, "capped")
    assert [m.id for m in capped.models.list().data] == ["tier-a"]
    assert {m.id for m in api(server, "open").models.list().data} == {"llama", "strong", "tier-a", "tier-c"}
    assert capped.models.retrieve("tier-a").id == "tier-a"
    with pytest.raises(openai.NotFoundError):
        capped.models.retrieve("llama")
    with pytest.raises(openai.NotFoundError) as e:
        capped.completions.create(model="llama", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found" and "tier-a" in e.value.message and "`llama`" in e.value.message
    # Without a model, the tenant's first; the cap is what a request without max_tokens gets.
    r = httpx.post(server.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['capped']}"},
                   json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}, timeout=60).json()
    assert r["model"] == "llama" and r["routing"]["tier"] == "tier-a" and r["usage"]["completion_tokens"] == 8
    r = capped.completions.create(model="tier-a", prompt="hi", extra_body={"ignore_eos": True})  # default 16 > 8
    assert r.usage.completion_tokens == 8
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as e:
            capped.chat.completions.create(model="tier-a", messages=[{"role": "user", "content": "hi"}],
                                           **{field: 9})
        assert e.value.param == field and "at most 8 tokens" in e.value.message
    assert capped.chat.completions.create(model="tier-a", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8).usage.completion_tokens <= 8
    # The cap is an upper bound: a prompt that leaves less room gets that room, not a 400.
    room = 3
    n = api(server, "open").models.retrieve("llama").model_extra["max_model_len"] - room
    r = capped.completions.create(model="tier-a", prompt=[7] * n, max_tokens=None, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"


def test_stored_responses_are_the_tenants_own(server):
    """The Responses API's stored responses: another tenant's id is not found (retrieve, delete,
    continue), and a tenant's max_tokens cap holds for max_output_tokens and through a tier."""
    mine, theirs = api(server, "open"), api(server, "other")
    r = mine.responses.create(model="llama", input="hi", max_output_tokens=3, extra_body={"ignore_eos": True})
    for call in (lambda: theirs.responses.retrieve(r.id), lambda: theirs.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError, match="not found"):
        theirs.responses.create(model="llama", input="x", previous_response_id=r.id)
    assert mine.responses.retrieve(r.id).id == r.id
    streamed = list(mine.responses.create(model="llama", input="hi", max_output_tokens=2, stream=True))[-1].response
    with pytest.raises(openai.NotFoundError):  # (kept when the stream ends, after its handler returned)
        theirs.responses.retrieve(streamed.id)
    assert mine.responses.retrieve(streamed.id).id == streamed.id
    nxt = mine.responses.create(model="llama", input="more", previous_response_id=r.id, max_output_tokens=2)
    assert nxt.usage.input_tokens > r.usage.input_tokens
    capped = api(server, "capped")
    with pytest.raises(openai.BadRequestError) as e:
        capped.responses.create(model="tier-a", input="hi", max_output_tokens=9)
    assert e.value.param == "max_output_tokens" and "at most 8 tokens" in e.value.message
    r = capped.responses.create(model="tier-a", input="hi", extra_body={"ignore_eos": True})
    assert r.usage.output_tokens == 8 and r.model == "llama" and r.model_extra["routing"]["tier"] == "tier-a"


def test_requests_per_minute_under_32_clients(server):
    client = api(server, "rpm")
    results = hammer(32, lambda i: client.completions.create(model="llama", prompt=f"hi {i}", max_tokens=2))
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) == 10 and len(refused) == 22, [r for r in results if isinstance(r, Exception)][:3]
    for e in refused:
        assert e.code == "rate_limit_exceeded"
        wait = int(e.response.headers["retry-after"])
        assert 1 <= wait <= 60
        assert message(e) == f"tenant rpm: requests_per_minute limit 10 reached; retry in {wait} s"
    assert rejected(server, "rpm", "requests_per_minute") == 22


def test_tokens_per_minute_under_32_clients(server):
    """Each request reserves its prompt and max_tokens; ignore_eos makes it use exactly that, so the
    number admitted is the limit divided by one request's tokens, however the 32 race."""
    client = api(server, "tpm")
    results = hammer(32, lambda i: client.completions.create(model="llama", prompt="hello there", max_tokens=90,
                                                             extra_body={"ignore_eos": True}))
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) + len(refused) == 32, [r for r in results if isinstance(r, Exception)][:3]
    per_request = ok[0].usage.total_tokens
    used = sum(r.usage.total_tokens for r in ok)
    assert len(ok) == 1000 // per_request and used <= 1000
    for e in refused:
        wait = int(e.response.headers["retry-after"])
        assert 1 <= wait <= 60
        assert message(e).startswith("tenant tpm: tokens_per_minute limit 1000 reached (")
        assert message(e).endswith(f"this request may use {per_request}); retry in {wait} s")
    assert rejected(server, "tpm", "tokens_per_minute") == len(refused)
    with pytest.raises(openai.BadRequestError) as e:  # more than the whole minute's tokens: waiting cannot help
        client.completions.create(model="llama", prompt="hello", max_tokens=1001)
    assert e.value.param == "max_tokens" and "more than its tokens_per_minute limit 1000" in e.value.message


def test_concurrency_under_32_clients(server):
    """32 requests that each stay about 3 s in flight, released together: at most 3 run at once
    (the in-flight gauge, sampled throughout), and when all 32 arrived within 1.5 s, exactly 3 ran."""
    client = api(server, "conc")
    peak, stop = [0.0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], in_flight(server, "conc"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent = []
    try:
        def one(i):
            sent.append(time.monotonic())
            return client.completions.create(model="llama", prompt=f"hi {i}", max_tokens=60, seed=SLOW_SEED,
                                             extra_body={"ignore_eos": True})

        results = hammer(32, one)
    finally:
        stop.set()
        watcher.join()
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) + len(refused) == 32, [r for r in results if isinstance(r, Exception)][:3]
    assert 3 <= len(ok) and peak[0] == 3
    if max(sent) - min(sent) < 1.5:
        assert len(ok) == 3
    for e in refused:
        assert e.response.headers["retry-after"] == "1"
        assert message(e) == ("tenant conc: max_concurrent_requests limit 3 reached; retry when one of its "
                             "requests has finished")
    assert rejected(server, "conc", "concurrent_requests") == len(refused)
    assert in_flight(server, "conc") == 0


def wait_idle(server, tenant: str, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while in_flight(server, tenant) != 0:
        assert time.time() < deadline, f"tenant {tenant}: {in_flight(server, tenant)} still in flight"
        time.sleep(0.05)


def test_concurrency_is_released_on_every_path(server):
    client = api(server, "release")
    slow = {"model": "llama", "prompt": "tell me", "max_tokens": 400, "seed": SLOW_SEED,
            "extra_body": {"ignore_eos": True}}
    # Two streams hold both slots; a third request is refused; the clients abandon them midway.
    streams = [client.completions.create(stream=True, **slow) for _ in range(2)]
    for s in streams:
        next(iter(s))
    assert in_flight(server, "release") == 2
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="llama", prompt="hi", max_tokens=1)
    for s in streams:
        s.close()
    wait_idle(server, "release")
    # Refused after admission, three times the slots each: validation in the route, the engine's
    # own check (prompt + max_tokens beyond the context), a fault inside the engine (streamed and not).
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                           top_logprobs=2)
        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model="llama", prompt="hi", max_tokens=5000)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="llama", prompt="hi", max_tokens=4, seed=POISON_SEED)
        with pytest.raises(openai.APIError, match="injected fault"):  # the stream's error event
            list(client.completions.create(model="llama", prompt="hi", max_tokens=4, seed=POISON_SEED, stream=True))
    # A non-streamed request whose client gives up while it runs.
    with pytest.raises(openai.APITimeoutError):
        api(server, "release", timeout=0.5).completions.create(**slow)
    wait_idle(server, "release")
    # Every slot is free again: two run at once.
    results = hammer(2, lambda i: client.completions.create(model="llama", prompt=f"hi {i}", max_tokens=20,
                                                            seed=SLOW_SEED, extra_body={"ignore_eos": True}))
    assert all(r.usage.completion_tokens == 20 for r in results), results
    wait_idle(server, "release")
    assert rejected(server, "release", "concurrent_requests") == 1


def test_tokens_settle_to_what_was_used(server):
    """A reservation shrinks to the real count when the request ends early (an abandoned stream, an
    engine fault), so the tenant's minute is not spent on tokens never generated."""
    client = api(server, "settle")
    stream = client.completions.create(model="llama", prompt="hi", max_tokens=600, seed=SLOW_SEED, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    with pytest.raises(openai.RateLimitError):  # 600 reserved (and the prompt): 600 more do not fit
        client.completions.create(model="llama", prompt="hi", max_tokens=600)
    stream.close()
    wait_idle(server, "settle")
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="llama", prompt="hi", max_tokens=600, seed=POISON_SEED)
    r = client.completions.create(model="llama", prompt="hi", max_tokens=600, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 600


def test_an_escalated_cascade_counts_both_models_tokens(server):
    """A cascade tier that escalates ran the prompt on both models, and tokens on both: the tenant's
    tokens_per_minute counts all of it, as usage.compute does."""
    import re

    client = api(server, "cascade")
    r = client.completions.create(model="tier-c", prompt="Tell me about the tenants", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    routing = r.routing  # type: ignore[attr-defined]
    assert r.model == "strong" and routing["escalated"] and r.usage.completion_tokens == 16
    wait_idle(server, "cascade")
    prompt, small = r.usage.prompt_tokens, routing["small_tokens"]
    assert 0 < small < 16
    deadline = time.time() + 15
    while True:  # (the small model's abort reports its last tokens after the response)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="llama", prompt="hi", max_tokens=990)
        used = int(re.search(r"\((\d+) used or reserved", message(e.value)).group(1))
        # both prompts, the small model's tokens (the few it made while its abort was on the way too)
        # and the strong model's 16
        if used >= 2 * prompt + small + 16 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert 2 * prompt + small + 16 <= used <= 2 * prompt + 16 + 16, (used, prompt, small)


def test_tenants_never_share_cache_blocks(server):
    prompt = "The tenants of this server each get their own prefix cache. " * 12
    a, b = api(server, "open"), api(server, "other")

    def cached(client) -> int:
        r = client.completions.create(model="llama", prompt=prompt, max_tokens=1)
        assert r.usage.prompt_tokens > 64
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(a) == 0
    assert cached(a) > 0  # the same tenant shares its blocks
    assert cached(b) == 0  # another tenant does not, with the same prompt
    assert cached(b) > 0


def test_startup_errors_name_the_problem(model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    env = dict(os.environ, PYTHONPATH=ROOT)
    unknown_model = yaml.safe_dump({"tenants": [{"name": "a", "keys_sha256": [hash_key("k")], "models": ["nope"]}]})
    for text, message in (("tenants: [{name: a, keys_sha256: [abc]}]", "keys_sha256[0]: not a sha256 digest"),
                          (unknown_model, "tenant 'a': models: 'nope' is not a model or tier of this server")):
        bad.write_text(text)
        p = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", "--model", model_dir, "--tenants",
                            str(bad), "--port", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert p.returncode == 2 and message in p.stderr, p.stderr


def test_a_tenants_cap_and_the_models_default_max_tokens_take_the_lower():
    """A request without max_tokens from a capped tenant: the model's generation_config default
    applies when it is the lower (the cap, filled in first, hid it), and either is an upper bound."""
    from types import SimpleNamespace

    from tokenmill.server.context import REQUEST_TAGS, ServerContext
    from tokenmill.server.protocol import ChatCompletionRequest

    ctx = object.__new__(ServerContext)
    for default, want in ((100, 100), (8000, 4096), (None, 4096)):
        ctx.llm_engine = SimpleNamespace(default_sampling={} if default is None else {"max_tokens": default})
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4096)  # (the cap)
        token = REQUEST_TAGS.set({"max_tokens_is_cap": True})
        try:
            p = ctx.sampling_params(req, req.max_tokens, None)
        finally:
            REQUEST_TAGS.reset(token)
        assert (p.max_tokens, p._max_tokens_is_cap) == (want, True)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=300)  # the client's
    p = ctx.sampling_params(req, 300, None)
    assert p.max_tokens == 300 and not p._max_tokens_is_cap
