"""The fleet router's parts without processes: policies on synthetic loads, the KV-event index on
synthetic event streams, and prompt keys equal to the engine's own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

import httpx
import pytest

from tokenmill.engine.block_manager import block_hashes
from tokenmill.router import replicas as replicas_mod
from tokenmill.router.index import PromptHasher, ReplicaIndex
from tokenmill.router.policy import Candidate, Chooser, KVAwareWeights, kv_aware_cost
from tokenmill.router.replicas import Replica
from tokenmill.router.router import Router, RouterConfig, _StreamState
from tokenmill.server.kv_events import KVEventHub, Subscriber


def keys(ids, bs=4, salt=None):
    return block_hashes(ids, bs, salt)


# -- policies ----------------------------------------------------------------------------------------
def test_kv_aware_prefers_the_replica_holding_the_prefix():
    c = Chooser("kv_aware")
    cands = [Candidate("a"), Candidate("b", cached_tokens=480), Candidate("c")]
    for _ in range(5):  # whatever the turn
        assert c.choose(cands, 500) == (1, "prefix")


def test_kv_aware_leaves_a_holder_that_is_too_busy():
    w = KVAwareWeights(decode_weight=32)
    c = Chooser("kv_aware", w)
    holder = Candidate("a", cached_tokens=480, queued_prefill=900, running=4)
    idle = Candidate("b")
    # 20 uncached + 900 queued + 128 > 500 uncached on an idle one
    assert kv_aware_cost(holder, 500, w) > kv_aware_cost(idle, 500, w)
    assert c.choose([holder, idle], 500) == (1, "load")
    # with little queued, the prefix wins again
    holder.queued_prefill = 100
    assert c.choose([holder, idle], 500)[0] == 0


def test_kv_aware_full_cache_counts_against_a_replica():
    c = Chooser("kv_aware")
    full = Candidate("a", cached_tokens=200, kv_usage=0.99)
    other = Candidate("b", kv_usage=0.2)
    assert c.choose([full, other], 250)[0] == 1
    full.kv_usage = 0.5
    assert c.choose([full, other], 250)[0] == 0


def test_kv_aware_without_prefix_balances_load_and_rotates_ties():
    c = Chooser("kv_aware")
    assert c.choose([Candidate("a", running=3), Candidate("b", running=1)], 100)[0] == 1
    picks = {c.choose([Candidate("a"), Candidate("b")], 100)[0] for _ in range(4)}
    assert picks == {0, 1}


def test_round_robin_and_least_loaded():
    rr = Chooser("round_robin")
    assert [rr.choose([Candidate("a"), Candidate("b"), Candidate("c")])[0] for _ in range(6)] == [1, 2, 0, 1, 2, 0]
    ll = Chooser("least_loaded")
    cands = [Candidate("a", inflight=3), Candidate("b", running=1, waiting=1), Candidate("c", inflight=2)]
    assert ll.choose(cands) == (1, "load")
    # reported load counts even when the router sent nothing (other clients)
    assert ll.choose([Candidate("a", running=5), Candidate("b", inflight=1)])[0] == 1
    with pytest.raises(ValueError):
        Chooser("random")


# -- the KV event index --------------------------------------------------------------------------
def test_index_follows_snapshot_and_events():
    ids = list(range(1, 30))
    k = keys(ids)  # 7 blocks
    idx = ReplicaIndex()
    idx.hello({"m": 4})
    assert idx.match("m", k) == 0 and not idx.synced("m")
    idx.snapshot("m", 4, 5, [h.hex() for h in k[:3]])
    assert idx.match("m", k) == 3
    assert idx.apply("m", 6, [["stored", [h.hex() for h in k[3:6]]]])
    assert idx.match("m", k) == 6
    assert idx.apply("m", 7, [["removed", [k[1].hex()]]])
    assert idx.match("m", k) == 1  # a prefix stops at the first block missing
    assert idx.apply("m", 8, [["cleared"], ["stored", [k[0].hex()]]])
    assert idx.match("m", k) == 1


def test_index_gap_or_lost_stream_means_load_only_until_resync():
    k = keys(list(range(40)))
    idx = ReplicaIndex()
    idx.hello({"m": 4})
    idx.snapshot("m", 4, 0, [h.hex() for h in k])
    assert not idx.apply("m", 2, [["stored", []]])  # event 1 was lost
    assert idx.match("m", k) == 0 and not idx.synced("m")
    idx.snapshot("m", 4, 2, [h.hex() for h in k])
    assert idx.match("m", k) == len(k)
    idx.lost()
    assert idx.match("m", k) == 0
    idx.add_pending("m", k[:2])  # pending prefixes do not count while out of sync either
    assert idx.match("m", k) == 0


def test_pending_prefixes_count_until_the_request_ends():
    k = keys(list(range(40)))
    idx = ReplicaIndex()
    idx.hello({"m": 4})
    idx.snapshot("m", 4, 0, [])
    idx.add_pending("m", k[:5])
    idx.add_pending("m", k[:3])
    assert idx.match("m", k) == 5
    idx.remove_pending("m", k[:5])
    assert idx.match("m", k) == 3
    idx.remove_pending("m", k[:3])
    assert idx.match("m", k) == 0


def test_hub_events_rebuild_the_engine_state():
    """A hub's snapshot and events, applied by a router's index, give the hub's key set; a
    subscriber that falls behind is dropped."""
    async def go():
        hub = KVEventHub("m", 4)
        k = keys(list(range(64)))
        sub = Subscriber()
        hub.subscribe(sub)
        hub.reset(k[:2])
        hub.apply([("stored", k[2]), ("stored", k[3]), ("removed", k[0]), ("stored", k[4])])
        hub.apply([("cleared", None), ("stored", k[5])])
        idx = ReplicaIndex()
        idx.hello({"m": 4})
        while not sub.queue.empty():
            ev = sub.queue.get_nowait()
            if ev["type"] == "snapshot":
                idx.snapshot(ev["model"], ev["block_size"], ev["seq"], ev["hashes"])
            else:
                assert idx.apply(ev["model"], ev["seq"], ev["ops"])
        assert idx.models["m"].keys == hub.keys == {k[5]}
        slow = Subscriber(max_queued=2)
        hub.subscribe(slow)  # the snapshot is 1
        hub.apply([("stored", k[6])])
        hub.apply([("stored", k[7])])
        assert slow.lost and slow not in hub.subscribers and sub in hub.subscribers

    asyncio.run(go())


# -- prompt keys ---------------------------------------------------------------------------------
def test_router_keys_are_the_engines_keys(model_dir, llm):
    """The router hashes a prompt (completions text, chat template, a salt) into exactly the keys
    the engine's prefix cache registers for it."""
    from tokenmill import SamplingParams

    engine = llm.engine
    bs = engine.config.block_size
    h = PromptHasher(model_dir)
    text = "the router hashes what the engine caches, " * 6
    chat = {"messages": [{"role": "system", "content": "You are terse. " * 10},
                         {"role": "user", "content": "hello"}]}
    cases = [
        ("completions", {"prompt": text}, None),
        ("completions", {"prompt": text, "cache_salt": "tenant-a"}, "tenant-a"),
        ("chat", chat, None),
    ]
    for endpoint, body, salt in cases:
        ids = h.token_ids(endpoint, body)
        if endpoint == "chat":
            tok = h.tokenizer
            text_c = tok.apply_chat_template(chat["messages"], add_generation_prompt=True, tokenize=False)
            assert ids == tok.encode(text_c, add_special_tokens=False)
        else:
            assert ids == h.tokenizer.encode(body["prompt"])
        k = PromptHasher.keys(ids, bs, salt)
        assert len(k) == (len(ids) - 1) // bs > 2
        engine.reset_prefix_cache()
        prompt = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
        llm.generate(prompt, SamplingParams(max_tokens=1))
        cached = set(engine.block_manager._cached)
        assert set(k) <= cached, endpoint
        # another salt, or none, gives other keys
        other = PromptHasher.keys(ids, bs, "someone-else")
        assert not set(other) & cached
    assert PromptHasher.keys(ids, bs, "tenant:acme\x00\ud800") == []  # a salt the replica refuses (400): no keys
    assert h.token_ids("chat", {"messages": "not a list"}) is None
    assert h.token_ids("completions", {"prompt": [1, 2, 3]}) == [1, 2, 3]
    # truncate_prompt_tokens: what the replica prefills, its last k tokens
    cut = {"prompt": list(range(5, 45)), "truncate_prompt_tokens": 10}
    assert h.token_ids("completions", cut) == list(range(35, 45))
    assert len(h.token_ids("chat", {**chat, "truncate_prompt_tokens": 7})) == 7
    assert h.token_ids("completions", {"prompt": ["first one", "second"]}) == h.tokenizer.encode("first one")
    # tools as clients send them (type left out, keys in another order) render as the server renders them
    from tests.models import TOOLS_CHAT_TEMPLATE

    tok = h.tokenizer
    tok.chat_template = TOOLS_CHAT_TEMPLATE
    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    msgs = [{"role": "user", "content": "weather?"}]
    want = tok.encode(tok.apply_chat_template(msgs, tools=[{"type": "function", "function": fn}],
                                              add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    for tools in ([{"function": fn}], [{"function": fn, "type": "function"}]):
        assert h.token_ids("chat", {"messages": msgs, "tools": tools}) == want
    # the Responses API's request: hashed as the chat request the replica runs (instructions first)
    body = {"instructions": "Be brief.", "input": [{"role": "user", "content": [{"type": "input_text",
                                                                                   "text": "weather?"}]}],
            "tools": [{"type": "function", **fn}], "tool_choice": "auto"}
    as_chat = {"messages": [{"role": "system", "content": "Be brief."}, *msgs], "tools": [{"function": fn}]}
    assert h.token_ids("responses", body) == h.token_ids("chat", as_chat) is not None
    assert h.token_ids("responses", {**body, "previous_response_id": "resp_1"}) is None  # (the replica's history)


# -- replicas (no processes: httpx's mock transport) ---------------------------------------------------
def test_kv_event_stream_backoff_resets_after_a_stream_that_connected(monkeypatch):
    """Streams that connect (hello, snapshot) and then end (a replica restarted, or it dropped a slow
    subscriber) are reopened at once, not after a delay that kept doubling."""
    body = ("data: " + json.dumps({"type": "hello", "models": {"m": 16}}) + "\n\n" +
            "data: " + json.dumps({"type": "snapshot", "model": "m", "block_size": 16, "seq": 1, "hashes": []})
            + "\n\n")
    transport = httpx.MockTransport(lambda req: httpx.Response(200, text=body,
                                                               headers={"content-type": "text/event-stream"}))
    delays = []
    real_sleep = asyncio.sleep

    async def fake_sleep(d, *a):
        delays.append(d)
        if len(delays) >= 7:
            raise asyncio.CancelledError
        await real_sleep(0)

    monkeypatch.setattr(replicas_mod.asyncio, "sleep", fake_sleep)

    async def main():
        rep = Replica("http://r")
        rep.up = True
        async with httpx.AsyncClient(transport=transport) as c:
            with pytest.raises(asyncio.CancelledError):
                await rep._events(c, 10.0)

    asyncio.run(main())
    assert max(delays) <= 0.25, delays


def test_router_learns_the_tokenizer_folder_of_every_model(tmp_path):
    """Replicas serving different models: each model's folder (their /v1/models `root`) is learned."""
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    cards = {"a": [{"id": "X", "root": str(tmp_path / "x")}], "b": [{"id": "Y", "root": str(tmp_path / "y")}]}
    transport = httpx.MockTransport(lambda req: httpx.Response(200, json={"object": "list",
                                                                           "data": cards[req.url.host]}))

    async def main():
        router = Router(RouterConfig(), ["http://a", "http://b"])
        router.client = httpx.AsyncClient(transport=transport)
        for rep in router.replicas.values():
            rep._mark_up()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        await router.client.aclose()
        return router.roots

    assert set(asyncio.run(main())) == {"X", "Y"}


def test_tenant_requests_no_replica_admitted_give_their_place_back():
    """A router with --tenants counts a tenant's request against requests_per_minute only when a
    replica took it: the router's own 413 and 503, a replica's 401/403/404/429 (whatever its
    body)/5xx give the place back, streamed or not; a 400 (validation after admission) and a 200
    count. Every path releases the concurrency slot."""
    from tokenmill.ops.tenants import hash_key, parse_tenants
    from tokenmill.router.cli import _serve_api_key

    answers = {
        "ok": None, "e400": (400, "invalid_request"), "e401": (401, "invalid_api_key"),
        "e404": (404, "model_not_found"), "e500": (500, None), "e503": (503, None),
        "tpm": (429, "rate_limit_exceeded"), "queue": (429, "queue_full"), "text429": (429, "text"),
    }
    mode = ["ok"]

    def replica(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        if req.url.path != "/v1/completions":
            return httpx.Response(404, json={"error": {"message": "no", "code": None}})
        ans = answers[mode[0]]
        if ans is not None and ans[1] == "text":
            return httpx.Response(ans[0], text="Too Many Requests")
        if ans is not None:
            return httpx.Response(ans[0], json={"error": {"message": "refused", "type": "t", "param": None,
                                                          "code": ans[1]}})
        if json.loads(req.content).get("stream"):
            chunk = {"id": "x", "choices": [{"index": 0, "text": "a", "token_ids": [7], "finish_reason": "stop"}]}
            return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "x", "choices": [{"index": 0, "text": "a", "finish_reason": "stop"}]})

    tenants = parse_tenants({"tenants": [{"name": "acme", "keys_sha256": [hash_key("k")],
                                          "requests_per_minute": 1000, "max_concurrent_requests": 5}]})
    auth = {"authorization": "Bearer k"}

    async def main() -> dict[tuple[str, bool], tuple[int, int]]:
        router = Router(RouterConfig(policy="round_robin", tenants=tenants, max_body_bytes=2000), ["http://r"])
        router.client = httpx.AsyncClient(transport=httpx.MockTransport(replica))
        (rep,) = router.replicas.values()
        state = router.tenants.states["acme"]
        got = {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app), base_url="http://router") as c:
            async def counted(**kw) -> tuple[int, int]:
                before = state.requests.total
                r = await c.post("/v1/completions", headers=auth, **kw)
                await r.aread()
                assert state.in_flight == 0
                return r.status_code, state.requests.total - before

            got["down", False] = await counted(json={"model": "m", "prompt": "x"})  # no replica up: 503
            rep.up = True
            for m in answers:
                for stream in (False, True):
                    mode[0] = m
                    got[m, stream] = await counted(json={"model": "m", "prompt": "x", "stream": stream})
            got["too large", False] = await counted(content=b"x" * 3000)
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
            assert r.status_code == 401 and state.requests.total == 4  # (2 oks, 2 400s) the router's 401 adds none
        await router.client.aclose()
        return got

    got = asyncio.run(main())
    want = {("down", False): (503, 0), ("too large", False): (413, 0)}
    for m, ans in answers.items():
        for stream in (False, True):
            want[m, stream] = (200, 1) if ans is None else (ans[0], 1 if ans[0] == 400 else 0)
    assert got == want
    assert _serve_api_key(["--model", "m", "--api-key", "a", "--api-key=b", "--admin-api-key", "c"]) == "b"
    assert _serve_api_key(["--api-key"]) is None and _serve_api_key(["--api-keys", "x"]) is None


def test_a_stream_never_started_leaves_nothing_open():
    """A client gone before a stream's response starts (its `send` fails; Starlette then never
    iterates the body, whose generator's finally would have cleaned up): the replica's ticket
    ends and its relay closes anyway, and a tenant's slot is released."""
    import gc

    from tokenmill.ops.tenants import hash_key, parse_tenants

    chunk = {"id": "x", "choices": [{"index": 0, "text": "a", "token_ids": [7], "finish_reason": "stop"}]}

    def replica(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
                              headers={"content-type": "text/event-stream"})

    tenants = parse_tenants({"tenants": [{"name": "acme", "keys_sha256": [hash_key("k")]}]})
    body = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "root_path": "", "query_string": b"", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
             "headers": [(b"authorization", b"Bearer k"), (b"content-type", b"application/json")], "state": {}}

    async def main() -> None:
        router = Router(RouterConfig(policy="round_robin", tenants=tenants), ["http://r"])
        router.client = httpx.AsyncClient(transport=httpx.MockTransport(replica))
        (rep,) = router.replicas.values()
        rep.up = True
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            if message["type"] == "http.response.start":
                raise OSError("the client is gone")

        from starlette.requests import ClientDisconnect

        with contextlib.suppress(OSError, ClientDisconnect):
            await router.app(scope, receive, send)
        gc.collect()
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert (rep.inflight, rep.prefilling, rep.decoding, len(rep.relays)) == (0, {}, 0, 0)
        assert router.tenants.in_flight() == {"acme": 0}
        await router.client.aclose()

    asyncio.run(main())


def test_the_end_a_router_writes_for_a_stream_counts_a_clients_resumed_tokens():
    """A replica gone after a stream's last token but before its usage: the router writes the usage,
    counting the tokens the client resumed with, as the replica would have (and the prompt by the ids
    the resumed replica sent)."""
    body = {"stream": True, "stream_options": {"include_usage": True}, "resume_token_ids": list(range(10))}
    state = _StreamState(body, "completions", want_ids=False)
    state.take({"id": "cmpl-1", "created": 1, "model": "m", "choices": [
        {"index": 0, "text": "x" * 20, "token_ids": list(range(20)), "prompt_token_ids": list(range(13)),
         "finish_reason": "length"}]})
    assert state.finished()
    usage = json.loads(state.ending()[0][len("data: "):])["usage"]
    assert usage == {"prompt_tokens": 13, "completion_tokens": 30, "total_tokens": 43}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_local_replicas_go_when_their_router_is_killed():
    """`router --replicas N` SIGKILLed runs no teardown: its replicas get SIGTERM from the kernel
    (they lived on, holding their ports)."""
    import signal
    import subprocess
    import time

    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "from tokenmill.router.replicas import _die_with_parent\n"
         "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_die_with_parent())\n"
         "print(c.pid, flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/status") as f:
            if "zombie" in f.read():
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the replica outlived its router")


def _value(router: Router, name: str, **labels) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


def test_router_metrics_count_generation_requests_once(model_dir):
    """Routing decisions, prompt tokens and latencies are about generation requests: a retried request's
    prompt counts once (each attempt is a decision), and the traffic the catch-all relays (/version,
    /tokenize, a stored response's GET) counts in none of them. Tenants' refusal series start at 0."""
    from tokenmill.ops.tenants import hash_key, parse_tenants

    failed = []

    def replica(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/completions" and not failed:
            failed.append(req.url.host)  # the first attempt fails: retried on the other replica
            return httpx.Response(503, json={"error": {"message": "busy", "code": None}})
        if req.url.path == "/v1/completions":
            return httpx.Response(200, json={"id": "x", "choices": [{"index": 0, "text": "a",
                                                                     "finish_reason": "stop"}]})
        return httpx.Response(200, json={"version": "1", "tokens": [1, 2]})

    tenants = parse_tenants({"tenants": [{"name": "acme", "keys_sha256": [hash_key("k")]}]})
    body = {"model": "m", "prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 3}

    async def main() -> Router:
        router = Router(RouterConfig(policy="kv_aware", tokenizer=model_dir, tenants=tenants), ["http://a", "http://b"])
        router.client = httpx.AsyncClient(transport=httpx.MockTransport(replica))
        for rep in router.replicas.values():
            rep.up = True
        auth = {"authorization": "Bearer k"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app), base_url="http://router") as c:
            r = await c.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 200 and r.json()["failover"]["retries"] == 1
            for _ in range(3):
                assert (await c.get("/version")).status_code == 200
                assert (await c.post("/tokenize", json={"prompt": "x"})).status_code == 200
        await router.client.aclose()
        return router

    router = asyncio.run(main())
    assert len(failed) == 1
    prompt = len(router.hashers[""].token_ids("completions", body))
    assert _value(router, "tokenmill_router:prompt_tokens_total") == prompt > 0
    decisions = [s for m in router.metrics.registry.collect() for s in m.samples
                 if s.name == "tokenmill_router:routing_decisions_total"]
    assert sum(s.value for s in decisions) == 2  # the attempt that failed and its retry
    assert _value(router, "tokenmill_router:e2e_request_latency_seconds_count") == 1
    assert _value(router, "tokenmill_router:requests_total", replica="http://a", endpoint="other", outcome="ok") + \
        _value(router, "tokenmill_router:requests_total", replica="http://b", endpoint="other", outcome="ok") == 6
    for limit in ("requests_per_minute", "concurrent_requests"):  # at 0 from the start
        assert router.metrics.registry.get_sample_value("tokenmill_router:tenant_rejected_total",
                                                        {"tenant": "acme", "limit": limit}) == 0


def test_router_counts_clients_that_leave():
    """A client gone before its answer ended, unary or streamed: requests_total outcome client_closed
    (and no latency)."""
    import gc

    chunk = {"id": "x", "choices": [{"index": 0, "text": "a", "token_ids": [7], "finish_reason": None}]}

    async def endless():
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        await asyncio.sleep(3600)
        yield b""

    async def replica(req: httpx.Request) -> httpx.Response:
        if json.loads(req.content).get("stream"):
            return httpx.Response(200, content=endless(), headers={"content-type": "text/event-stream"})
        await asyncio.sleep(3600)

    def scope(body: bytes) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                "root_path": "", "query_string": b"", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
                "headers": [(b"content-type", b"application/json")], "state": {}}

    async def call(router: Router, stream: bool) -> list[dict]:
        body = json.dumps({"model": "m", "prompt": "x", "stream": stream}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.3)  # then the client goes
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body") and stream:
                raise OSError("the client is gone")  # after the first chunk

        from starlette.requests import ClientDisconnect

        with contextlib.suppress(OSError, ClientDisconnect):
            await asyncio.wait_for(router.app(scope(body), receive, send), 10)
        gc.collect()
        for _ in range(20):
            await asyncio.sleep(0.01)
        return sent

    async def main() -> Router:
        router = Router(RouterConfig(policy="round_robin"), ["http://r"])
        router.client = httpx.AsyncClient(transport=httpx.MockTransport(replica))
        (rep,) = router.replicas.values()
        rep.up = True
        sent = await call(router, stream=False)
        assert sent[0]["status"] == 499
        sent = await call(router, stream=True)
        assert sent[0]["status"] == 200
        assert (rep.inflight, len(rep.relays)) == (0, 0)
        await router.client.aclose()
        return router

    router = asyncio.run(main())
    assert _value(router, "tokenmill_router:requests_total", replica="http://r", endpoint="completions",
                  outcome="client_closed") == 2
    assert _value(router, "tokenmill_router:e2e_request_latency_seconds_count") == 0


def test_router_dashboard_merges_the_replicas():
    """GET /dashboard through a router: the page and its assets from the router itself, and
    /dashboard/data from every replica (asked with the caller's key) with a `replica` label, so the
    page follows each replica's counters apart; a replica that missed a poll keeps its last snapshot."""
    down = set()

    def replica(req: httpx.Request) -> httpx.Response:
        if req.url.path != "/dashboard/data":
            return httpx.Response(404, json={"error": {"message": "no", "code": None}})
        if req.headers.get("authorization") != "Bearer adm":
            return httpx.Response(401, json={"error": {"message": "bad key", "code": "invalid_api_key"}})
        if req.url.host in down:
            raise httpx.ConnectTimeout("slow")
        n = 10.0 if req.url.host == "a" else 32.0
        return httpx.Response(200, json={"time": 1.0, "types": {"tokenmill:generation_tokens_total": "counter"},
                                         "series": {"tokenmill:generation_tokens_total": [
                                             {"labels": {"model_name": "m", "tenant": "default"}, "value": n}]}})

    async def main() -> None:
        router = Router(RouterConfig(policy="round_robin"), ["http://a", "http://b"])
        router.client = httpx.AsyncClient(transport=httpx.MockTransport(replica))
        for rep in router.replicas.values():
            rep.up = True
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app), base_url="http://router") as c:
            page = await c.get("/dashboard")
            assert page.status_code == 200 and "dashboard/static/dashboard.js" in page.text
            assert "tokenmillDashboard" in (await c.get("/dashboard/static/dashboard.js")).text
            r = await c.get("/dashboard/data", headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            auth = {"authorization": "Bearer adm"}
            for _ in range(2):
                r = await c.get("/dashboard/data", headers=auth)
                assert r.status_code == 200
                data = r.json()
                got = {s["labels"]["replica"]: s["value"] for s in data["series"]["tokenmill:generation_tokens_total"]}
                assert got == {"http://a": 10.0, "http://b": 32.0}
                assert data["types"]["tokenmill:generation_tokens_total"] == "counter"
                down.add("b")  # the second poll: b does not answer, and is shown as it was
            down.add("a")  # nobody answers: nothing stale is shown
            assert (await c.get("/dashboard/data", headers=auth)).status_code == 503
        await router.client.aclose()

    asyncio.run(main())


def test_a_responses_stream_cut_midway_ends_as_the_responses_api_ends_one():
    """A replica lost mid-way through a /v1/responses stream (which cannot move): the client gets an
    `error` event and `response.failed`, numbered after the last event relayed; a stored response
    that only some replica could hold is not looked for without a tenant's key."""
    from tokenmill.ops.tenants import hash_key, parse_tenants

    created = {"id": "resp_1", "object": "response", "status": "in_progress", "store": True, "output": []}
    head = [("response.created", {"response": created}), ("response.in_progress", {"response": created}),
            ("response.output_text.delta", {"item_id": "msg_1", "delta": "hi"})]
    asked = []

    async def body():
        for i, (kind, fields) in enumerate(head):
            yield f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': i, **fields})}\n\n".encode()
        yield b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "sequence_number": 3'
        raise httpx.ReadError("connection reset")  # (within that event: it is never relayed, half)

    def replica(req: httpx.Request) -> httpx.Response:
        asked.append(req.url.path)
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    tenants = parse_tenants({"tenants": [{"name": "acme", "keys_sha256": [hash_key("k")]}]})

    async def main() -> None:
        router = Router(RouterConfig(policy="round_robin", tenants=tenants), ["http://r"])
        router.client = httpx.AsyncClient(transport=httpx.MockTransport(replica))
        (rep,) = router.replicas.values()
        rep.up = True
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app), base_url="http://router") as c:
            r = await c.post("/v1/responses", json={"model": "m", "input": "x", "stream": True},
                             headers={"authorization": "Bearer k"})
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            assert [e["type"] for e in events] == [k for k, _ in head] + ["error", "response.failed"]
            assert [e["sequence_number"] for e in events] == list(range(5))
            assert events[3]["code"] == "replica_failed" and "connection reset" in events[3]["message"]
            failed = events[4]["response"]
            assert failed["id"] == "resp_1" and failed["status"] == "failed" and failed["error"]["code"]
            assert router.response_homes == {"resp_1": "http://r"}
            before = len(asked)
            r = await c.get("/v1/responses/resp_other")  # no key: the router's 401, no replica asked
            assert r.status_code == 401 and len(asked) == before
        await router.client.aclose()

    asyncio.run(main())
