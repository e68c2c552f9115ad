"""Tenants across a fleet: `tokenmill router --tenants` over two `tokenmill serve --tenants` replicas,
real processes on 127.0.0.1, driven with the official openai client (and httpx for open streams).

The router takes tenants' keys only, hashes a tenant's prompts with the salt its replica gives
them (so KV-aware routing finds the tenant's cached blocks), holds max_concurrent_requests and
requests_per_minute for the whole fleet, and relays a replica's refusal by a tenant's own limit
instead of trying the other replica with it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.server_utils import ROOT, ServerProcess
from tests.test_fleet import HEADER, REPLICA_ARGS, router_metrics, wait_fleet
from tokenmill.ops.tenants import hash_key

OPERATOR_KEY = "operator-key"  # the replicas' --api-key: the router's KV event streams
SLOW_SEED = 4242  # a request with this seed takes 50 ms a step (tests/fault_server.py): it stays in flight
TENANTS = [
    {"name": "acme", "keys_sha256": [hash_key("acme-key")], "max_concurrent_requests": 2},
    {"name": "beta", "keys_sha256": [hash_key("beta-key")], "requests_per_minute": 3},
    {"name": "gamma", "keys_sha256": [hash_key("gamma-key")]},
    {"name": "delta", "keys_sha256": [hash_key("delta-key")], "tokens_per_minute": 100},
]


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet_tenants")
    path = d / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": TENANTS}))
    reps = [ServerProcess(model_dir, *REPLICA_ARGS, "--tenants", str(path), "--api-key", OPERATOR_KEY,
                          log_path=str(d / f"r{i}.log"), script=os.path.join(ROOT, "tests", "fault_server.py"),
                          env={"OMP_NUM_THREADS": "1", "TOKENMILL_FAULT_SLOW_SEED": str(SLOW_SEED)})
            for i in range(2)]
    router = ServerProcess(None, *[a for r in reps for a in ("--replica", r.base_url)], "--tenants", str(path),
                           "--replica-api-key", OPERATOR_KEY, "--health-interval", "0.2", "--health-timeout", "5",
                           log_path=str(d / "router.log"), command="router")
    try:
        wait_fleet(router, [r.base_url for r in reps])
        yield {"router": router, "replicas": reps}
    finally:
        router.stop()
        for r in reps:
            r.stop()


def client(fleet, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet["router"].base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def relayed(fleet, outcome: str) -> float:
    """Answers the router relayed from replicas with this outcome ("ok", "429", ...), all endpoints."""
    return sum(v for k, v in router_metrics(fleet["router"].base_url).items()
               if k.startswith("tokenmill_router:requests_total{") and f'outcome="{outcome}"' in k)


def test_the_router_takes_tenants_keys_only(fleet, model_name):
    url = fleet["router"].base_url
    before = relayed(fleet, "401")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {OPERATOR_KEY}"}):
        r = httpx.post(url + "/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 1},
                       headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key" and HEADER not in r.headers  # the router's answer
    with pytest.raises(openai.AuthenticationError):
        client(fleet, "nobody").embeddings.create(model=model_name, input="hi")
    assert relayed(fleet, "401") == before  # no replica was asked
    out = client(fleet, "gamma-key").completions.create(model=model_name, prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens == 2
    assert [m.id for m in client(fleet, "gamma-key").models.list().data] == [model_name]


def test_kv_aware_routing_finds_a_tenants_cached_prefix(fleet, model_name):
    """The replicas salt a tenant's blocks with its name; hashing without that salt the router would
    never find them, and would spread these requests over both replicas by load alone."""
    system = "You answer questions about tenants of the tokenmill fleet router and nothing else. " * 4

    def ask(key: str, i: int) -> tuple[str, int]:
        raw = client(fleet, key).chat.completions.with_raw_response.create(
            model=model_name, max_tokens=2,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}])
        return raw.headers[HEADER], raw.parse().usage.prompt_tokens_details.cached_tokens

    holder, _ = ask("gamma-key", 0)
    time.sleep(0.3)  # the replica's KV events reach the router
    for i in range(1, 6):
        rep, cached = ask("gamma-key", i)
        assert rep == holder and cached > 0, f"request {i}: {rep} (holder {holder}), {cached} cached"
    assert ask("acme-key", 0)[1] == 0  # another tenant's identical prompt shares no block


def _open_stream(fleet, model_name: str, key: str, prompt: str) -> tuple[httpx.Client, httpx.Response, Any]:
    """A stream that stays open (20 s at least): its first event read, the rest left unread."""
    c = httpx.Client(timeout=60)
    body = {"model": model_name, "prompt": prompt, "max_tokens": 400, "stream": True, "ignore_eos": True,
            "seed": SLOW_SEED}
    resp = c.send(c.build_request("POST", fleet["router"].base_url + "/v1/completions", json=body,
                                  headers={"authorization": f"Bearer {key}"}), stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()  # (kept: a reader dropped would close the connection)
    line = next(x for x in lines if x.startswith("data: "))
    assert "choices" in json.loads(line[6:])
    return c, resp, lines


def _in_flight(fleet, tenant: str) -> float:
    return router_metrics(fleet["router"].base_url).get(
        f'tokenmill_router:tenant_requests_in_flight{{tenant="{tenant}"}}', 0.0)


def _wait_in_flight(fleet, tenant: str, n: int) -> None:
    deadline = time.time() + 30
    while _in_flight(fleet, tenant) != n:
        assert time.time() < deadline, f"{tenant}: {_in_flight(fleet, tenant)} in flight, not {n}"
        time.sleep(0.05)


def test_max_concurrent_requests_holds_across_the_fleet(fleet, model_name):
    """acme may have 2 requests in flight: with one open on each replica, neither replica alone would
    refuse a third, the router does; a stream the client leaves frees its slot too."""
    streams = [_open_stream(fleet, model_name, "acme-key", f"first stream {i}") for i in range(2)]
    try:
        assert {resp.headers[HEADER] for _, resp, _ in streams} == {r.base_url for r in fleet["replicas"]}
        assert _in_flight(fleet, "acme") == 2
        with pytest.raises(openai.RateLimitError) as e:
            client(fleet, "acme-key").completions.create(model=model_name, prompt="third", max_tokens=1)
        assert "max_concurrent_requests limit 2" in str(e.value) and e.value.response.headers["retry-after"] == "1"
        assert HEADER not in e.value.response.headers
        # another tenant is not held back by acme's limit
        client(fleet, "gamma-key").completions.create(model=model_name, prompt="meanwhile", max_tokens=1)
    finally:
        for c, resp, _ in streams:
            resp.close()  # the client leaves mid-stream
            c.close()
    _wait_in_flight(fleet, "acme", 0)
    client(fleet, "acme-key").completions.create(model=model_name, prompt="again", max_tokens=1)
    m = router_metrics(fleet["router"].base_url)
    assert m['tokenmill_router:tenant_rejected_total{limit="concurrent_requests",tenant="acme"}'] == 1
    _wait_in_flight(fleet, "acme", 0)


def test_requests_per_minute_hold_across_the_fleet(fleet, model_name):
    """beta may send 3 a minute: the router counts them over both replicas; requests no replica
    admitted (here a model that does not exist) give their place back."""
    c = client(fleet, "beta-key")
    for _ in range(3):
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="no-such-model", prompt="q", max_tokens=1)
    reps = [c.completions.with_raw_response.create(model=model_name, prompt=f"q{i}", max_tokens=1).headers[HEADER]
            for i in range(3)]
    assert len(set(reps)) == 2  # each replica saw fewer than 3: alone, neither would refuse a fourth
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=model_name, prompt="q3", max_tokens=1)
    assert "requests_per_minute limit 3" in str(e.value)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    _wait_in_flight(fleet, "beta", 0)


def test_a_replicas_refusal_by_a_tenants_limit_is_not_tried_elsewhere(fleet, model_name):
    """delta's tokens_per_minute (100) is held by each replica: a request of ~65 tokens fills a
    replica's window. Once both are full, a third is refused by the replica it is sent to, and the
    router relays that 429 rather than asking the other replica (which, with room left, would
    multiply the tenant's limit)."""
    c = client(fleet, "delta-key")

    def ask(i: int):
        return c.completions.with_raw_response.create(model=model_name, prompt=f"d{i}", max_tokens=60,
                                                      extra_body={"ignore_eos": True})

    assert {ask(i).headers[HEADER] for i in range(2)} == {r.base_url for r in fleet["replicas"]}
    before = relayed(fleet, "429")
    with pytest.raises(openai.RateLimitError) as e:
        ask(2)
    assert "tokens_per_minute limit 100" in str(e.value) and HEADER in e.value.response.headers
    assert relayed(fleet, "429") == before + 1
    with pytest.raises(openai.RateLimitError) as e:  # a stream's the same (the router opens it elsewhere)
        c.completions.create(model=model_name, prompt="d3", max_tokens=60, stream=True)
    assert HEADER in e.value.response.headers
    assert relayed(fleet, "429") == before + 2


@pytest.mark.parametrize("key", [[], ["--replica-api-key", "the-operators"]])
def test_local_replicas_get_the_tenants_and_a_key_for_the_router(model_dir, model_name, tmp_path, key):
    """`tokenmill router --replicas 1 --tenants FILE`: the local replica gets the tenants too, and the
    router's key (--replica-api-key, or one it made): a replica with tenants shows its KV events to
    the operator's key only. So KV-aware routing has the replica's events and a tenant's prefix is
    found again."""
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": TENANTS}))
    router = ServerProcess(model_dir, "--replicas", "1", "--replica-threads", "1", "--tenants", str(path), *key,
                           "--replica-log-dir", str(tmp_path / "replicas"), "--health-interval", "0.2",
                           "--kv-cache-memory", "0.02", log_path=str(tmp_path / "router.log"), command="router")
    try:
        url = next(k.split('"')[1] for k in router_metrics(router.base_url) if "replica_up{" in k)
        wait_fleet(router, [url])  # (its KV events synced: the router's key opened them)
        with pytest.raises(openai.AuthenticationError):  # the replica's own check, with the file it was given
            openai.OpenAI(base_url=url + "/v1", api_key="nobody", max_retries=0).completions.create(
                model=model_name, prompt="hi", max_tokens=1)
        c = openai.OpenAI(base_url=router.base_url + "/v1", api_key="gamma-key", max_retries=0, timeout=60)
        prompt = "A prompt long enough to fill a few of the cache's blocks for the local replica. " * 3
        c.completions.create(model=model_name, prompt=prompt + "one", max_tokens=1)
        time.sleep(0.3)
        assert c.completions.create(model=model_name, prompt=prompt + "two", max_tokens=1).usage \
            .prompt_tokens_details.cached_tokens > 0
        assert router_metrics(router.base_url)["tokenmill_router:predicted_cached_tokens_total"] > 0
    finally:
        assert router.stop() == 0
