"""The fleet router's parts without processes: policies on synthetic loads, the KV-event index on
synthetic event streams, and prompt keys equal to the engine's own."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tokenmill.engine.block_manager import block_hashes
from tokenmill.router import replicas as replicas_mod
from tokenmill.router.index import PromptHasher, ReplicaIndex
from tokenmill.router.policy import Candidate, Chooser, KVAwareWeights, kv_aware_cost
from tokenmill.router.replicas import Replica
from tokenmill.router.router import Router, RouterConfig
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
