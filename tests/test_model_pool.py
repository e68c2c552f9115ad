"""The model pool (issue 13): several models in one server with hot-swap, tiers, admin routes.

Real server processes with the official openai client; references from the offline engine on
the same weights. The memory budget holds one model at a time, so requests to the other
model force swaps, and a short swap quantum lets a waiting model park a busy one mid-request.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import time

import httpx
import openai
import pytest
import yaml

from tests.models import make_model
from tests.server_utils import ServerProcess
from tokenmill import LLM, SamplingParams

KV_GIB = 0.0625  # each model's KV cache: 64 MiB
BUDGET_ONE = 0.1  # GiB: one model (64 MiB KV + ~1 MiB weights) at a time
PROMPTS = ["Hello world", "The quick brown fox", "def fib(n):", "Café crème"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    return {name: make_model(str(root / name), arch, seed=seed)
            for name, arch, seed in (("alpha", "llama", 0), ("beta", "llama", 1), ("gamma", "qwen2", 2))}


def write_yaml(path, doc) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


def reference(path: str, prompts: list[str], max_tokens: int, seed: int | None = None) -> list[str]:
    llm = LLM(path, kv_cache_memory_bytes=int(KV_GIB * 2**30))
    p = SamplingParams(temperature=0 if seed is None else 1.0, seed=seed, max_tokens=max_tokens)
    return [o.outputs[0].text for o in llm.generate(prompts, p)]


@pytest.fixture(scope="module")
def pool_server(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("pool_server")
    doc = {"memory_budget": BUDGET_ONE, "swap_quantum": 0.2,
           "models": [{"path": models["alpha"], "kv_cache_memory": KV_GIB},
                      {"path": models["beta"], "kv_cache_memory": KV_GIB}],
           "tiers": [{"name": "tokenmill/auto", "route": {"policy": "cascade", "small": "alpha", "strong": "beta",
                                                          "threshold": -0.0001, "window": 4}},
                     {"name": "trusting", "route": {"policy": "cascade", "small": "alpha", "strong": "beta",
                                                    "threshold": -1000.0, "metric": "mean"}},
                     {"name": "by-rules", "route": {"policy": "rules", "default": "alpha",
                                                    "rules": [{"model": "beta", "keywords": ["fox"]},
                                                              {"model": "beta", "min_max_tokens": 50}]}}]}
    srv = ServerProcess(None, "--models", write_yaml(d / "models.yaml", doc), "--admin-api-key", "sesame",
                        "--kv-transfer", "--kv-transfer-key", "kv-key", log_path=str(d / "server.log"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(pool_server):
    return openai.OpenAI(base_url=pool_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def states(srv: ServerProcess) -> dict[str, str]:
    data = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["state"] for m in data}


def test_models_lists_states_and_unknown_model_is_404_listing_them(pool_server, client):
    listed = {m.id for m in client.models.list().data}
    assert listed == {"alpha", "beta", "tokenmill/auto", "trusting", "by-rules"}
    card = httpx.get(pool_server.base_url + "/v1/models/alpha", timeout=10).json()
    assert card["size_bytes"] > card["weight_bytes"] > 0 and card["kv_cache_bytes"] == int(KV_GIB * 2**30)
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    msg = exc.value.body["message"]
    assert exc.value.body["code"] == "model_not_found"
    assert all(f"`{n}`" in msg for n in ("alpha", "beta", "tokenmill/auto"))
    # The budget holds one model: asking for each in turn moves the other out, and says so.
    for name, other in (("beta", "alpha"), ("alpha", "beta")):
        raw = client.completions.with_raw_response.create(model=name, prompt="Hello", max_tokens=2, temperature=0)
        body = raw.parse()
        assert body.model == name
        st = states(pool_server)
        assert st[name] == "active" and st[other] == "parked", st
    assert body.swap["from"] == "parked" and body.swap["wait_s"] >= 0  # type: ignore[attr-defined]
    # What is refused without the model (the body's own checks, the endpoint against its task) is
    # refused before a swap: beta stays parked, alpha active (a 400 parked alpha first, preempting it).
    for call in (lambda: client.completions.create(model="beta", prompt="x", max_tokens=2, suffix="!"),
                 lambda: client.completions.create(model="beta", prompt="x", max_tokens=0),
                 lambda: client.completions.create(model="beta", prompt="x", max_tokens=2, best_of=3),
                 lambda: client.completions.create(model="beta", prompt="x", max_tokens=2, temperature=-1),
                 lambda: client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}],
                                                        top_logprobs=3),
                 lambda: client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1}),
                 lambda: client.embeddings.create(model="beta", input="x")):
        with pytest.raises(openai.BadRequestError):
            call()
        assert states(pool_server) == {**st, "alpha": "active", "beta": "parked"}


def test_interleaved_requests_to_both_models_match_each_alone(models, pool_server, client):
    want = {name: reference(models[name], PROMPTS, 24) for name in ("alpha", "beta")}
    want_seeded = {name: reference(models[name], PROMPTS[:1], 24, seed=7)[0] for name in ("alpha", "beta")}
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in ("alpha", "beta")]

    def run(job):
        name, i = job
        r = client.completions.create(model=name, prompt=PROMPTS[i], max_tokens=24, temperature=0)
        return name, i, r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        for name, i, text in ex.map(run, jobs * 2):
            assert text == want[name][i], (name, i)
    for name in ("alpha", "beta"):
        r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=24, temperature=1.0, seed=7)
        assert r.choices[0].text == want_seeded[name]


def test_parking_a_busy_model_mid_request_changes_nothing(models, pool_server, client):
    long = reference(models["alpha"], PROMPTS[:1], 700)[0]
    before = pool_server.metrics().get('tokenmill:num_preemptions_total{model_name="alpha"}', 0.0)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        stream = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=700, temperature=0,
                                           stream=True)
        it = iter(stream)
        text = next(it).choices[0].text  # alpha is running its request now
        other = ex.submit(client.completions.create, model="beta", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        text += "".join(c.choices[0].text for c in it if c.choices)
        assert other.result().choices[0].text == reference(models["beta"], PROMPTS[1:2], 8)[0]
    assert text == long
    # beta waited its turn, then parked alpha with the request running: it was preempted and resumed.
    assert pool_server.metrics()['tokenmill:num_preemptions_total{model_name="alpha"}'] > before


def test_a_client_that_leaves_while_its_model_is_brought_back_swaps_nothing(pool_server, client):
    """A request waiting for a parked model, or a streamed cascade waiting for its strong one, stops
    waiting when its client goes away: it went on waiting (up to the load timeout), then brought the
    model back for no one, preempting the busy one."""
    auth = {"Authorization": "Bearer sesame"}
    assert httpx.post(f"{pool_server.base_url}/v1/models/alpha/load", headers=auth, timeout=60).status_code == 200
    swaps = pool_server.metric("tokenmill:model_swaps_total")
    stream = client.completions.create(model="alpha", prompt="Hi", max_tokens=900, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)  # alpha is busy: beta's turn comes after the swap quantum
    for body in ({"model": "beta", "prompt": "Hi", "max_tokens": 4},
                 {"model": "tokenmill/auto", "prompt": "Hi", "max_tokens": 16, "stream": True}):
        with pytest.raises(httpx.TimeoutException):
            with httpx.stream("POST", pool_server.base_url + "/v1/completions", json=body, timeout=0.1) as r:
                r.read()
    time.sleep(1.0)
    assert {n: states(pool_server)[n] for n in ("alpha", "beta")} == {"alpha": "active", "beta": "parked"}
    assert pool_server.metric("tokenmill:model_swaps_total") == swaps
    stream.close()


def test_cascade_escalates_a_low_confidence_answer(models, pool_server, client):
    strong = reference(models["beta"], PROMPTS[:2], 16)
    small = reference(models["alpha"], PROMPTS[:2], 16)

    def finished(model: str) -> dict[str, float]:
        return {k.split('finished_reason="')[1].split('"')[0]: v for k, v in pool_server.metrics().items()
                if k.startswith("tokenmill:request_success_total") and f'model_name="{model}"' in k}

    before = finished("alpha")
    for i in range(2):
        r = client.completions.create(model="tokenmill/auto", prompt=PROMPTS[i], max_tokens=16, temperature=0)
        assert r.model == "beta" and r.choices[0].text == strong[i]
        routing = r.routing  # type: ignore[attr-defined]
        assert routing["escalated"] is True and routing["model"] == "beta" and routing["confidence"] < -0.0001
        # A random model is never that sure of a token: the first full window falls below, and the
        # small model's answer stops there.
        assert routing["escalated_at_token"] == 4 and routing["small_tokens"] < 16
        if i == 0:  # the small model's request ends as escalated, not as a client's abort
            time.sleep(0.2)
            after = finished("alpha")
            assert after.get("escalated", 0) - before.get("escalated", 0) == 1
            assert after.get("abort", 0) == before.get("abort", 0)
        if i == 0:  # the small model's work is in the usage too (a prompt under one block: no cache hit)
            alone = client.completions.create(model="beta", prompt=PROMPTS[i], max_tokens=16, temperature=0)
            assert r.usage.compute["flops"] > alone.usage.compute["flops"] > 0  # type: ignore[attr-defined]
        r = client.completions.create(model="trusting", prompt=PROMPTS[i], max_tokens=16, temperature=0)
        assert r.model == "alpha" and r.choices[0].text == small[i]
        assert r.routing["escalated"] is False and r.routing["small_tokens"] == 16  # type: ignore[attr-defined]
    # Streamed: held until the decision, then the answer that stands, under its model's name.
    chunks = list(client.chat.completions.create(model="tokenmill/auto", max_tokens=8, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert {c.model for c in chunks} == {"beta"}
    assert chunks[0].routing["escalated"] is True  # type: ignore[attr-defined]
    direct = client.chat.completions.create(model="beta", max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="test_time_compute|use_beam_search"):
        client.completions.create(model="tokenmill/auto", prompt="x", max_tokens=4,
                                  extra_body={"use_beam_search": True, "n": 2})
    # The Responses API: the response, streamed or not, and as stored, names the model that answered;
    # a stream's response.created waits for the decision (it named the small model, and kept no routing).
    r = client.responses.create(model="tokenmill/auto", input="hi", max_output_tokens=8)
    assert r.model == "beta" and client.responses.retrieve(r.id).model == "beta"
    events = list(client.responses.create(model="tokenmill/auto", input="hi", max_output_tokens=8, stream=True))
    assert events[0].type == "response.created" and events[0].response.routing["escalated"] is True  # type: ignore
    assert {e.response.model for e in events if hasattr(e, "response")} == {"beta"}
    assert client.responses.retrieve(events[-1].response.id).model == "beta"  # type: ignore[union-attr]
    r = client.responses.create(model="trusting", input="hi", max_output_tokens=8)
    assert r.model == "alpha" and client.responses.retrieve(r.id).model == "alpha"


def test_rules_tier_picks_by_keyword_and_max_tokens(pool_server, client):
    r = client.completions.create(model="by-rules", prompt="The quick brown fox", max_tokens=2, temperature=0)
    assert r.model == "beta" and r.routing == {"tier": "by-rules", "policy": "rules", "rule": 0,  # type: ignore
                                               "model": "beta"}
    r = client.completions.create(model="by-rules", prompt="Hello", max_tokens=60, temperature=0)
    assert r.model == "beta" and r.routing["rule"] == 1  # type: ignore[attr-defined]
    r = client.completions.create(model="by-rules", prompt="Hello", max_tokens=2, temperature=0)
    assert r.model == "alpha" and r.routing["rule"] is None  # type: ignore[attr-defined]


def test_admin_load_unload_pin_behind_the_admin_key(models, pool_server, client):
    base = pool_server.base_url
    assert httpx.post(f"{base}/v1/models/alpha/load", timeout=30).status_code == 401
    auth = {"Authorization": "Bearer sesame"}
    r = httpx.post(f"{base}/v1/models/beta/load", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "active"
    assert states(pool_server)["alpha"] == "parked"
    # Tokenizing needs no device: the parked model's tokenizer answers and nothing moves.
    r = httpx.post(f"{base}/tokenize", json={"model": "alpha", "prompt": "Hello"}, timeout=30)
    assert r.status_code == 200 and r.json()["count"] > 0 and states(pool_server)["alpha"] == "parked"
    # Parking let every KV hold go: a transfer's GET or DELETE says so without bringing the model back.
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{base}/v1/kv_transfer/kvx-{'0' * 32}", params={"model": "alpha"},
                          headers={"Authorization": "Bearer kv-key"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "kv_transfer_not_found", r.text
    assert states(pool_server)["alpha"] == "parked"
    r = httpx.post(f"{base}/v1/models/beta/unload", headers=auth, json={"to": "disk"}, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "on_disk"
    # A model on disk holds no KV for a transfer: a 404, and no lease taken or given back (a second
    # unload below would find a count gone wrong as requests in flight).
    for _ in range(2):
        r = httpx.delete(f"{base}/v1/kv_transfer/kvx-{'0' * 32}", params={"model": "beta"},
                         headers={"Authorization": "Bearer kv-key"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_loaded", r.text
    # A request for a model on disk waits while it loads, then is answered as ever.
    r = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert r.choices[0].text == reference(models["beta"], PROMPTS[1:2], 8)[0]
    assert r.swap["from"] == "on_disk" and states(pool_server)["beta"] == "active"  # type: ignore[attr-defined]
    r = httpx.post(f"{base}/v1/models/alpha/unload", headers=auth, json={"to": "disk"}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{base}/v1/models/beta/unload", headers=auth, json={"to": "disk"}, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "on_disk", r.text
    r = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    # The budget holds one model: pinning one would leave the other no room, so it is refused.
    r = httpx.post(f"{base}/v1/models/beta/pin", headers=auth, timeout=60)
    assert r.status_code == 409 and "no room" in r.json()["error"]["message"]
    assert httpx.get(f"{base}/v1/models/beta", timeout=10).json()["pinned"] is False
    for path, body, status in (("tokenmill/auto/load", None, 400), ("nope/load", None, 404),
                               ("alpha/unload", {"to": "moon"}, 400), ("alpha/pin", {"pinned": "yes"}, 400)):
        r = httpx.post(f"{base}/v1/models/{path}", headers=auth, json=body, timeout=30)
        assert r.status_code == status and "error" in r.json(), (path, r.text)
    for raw in ("[" * 100_000, '{"to":' * 50_000):  # nested too deeply for json: a 400, as the API routes answer
        r = httpx.post(f"{base}/v1/models/alpha/unload", headers={**auth, "Content-Type": "application/json"},
                       content=raw, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_many_streams_over_three_models_with_swaps(models, tmp_path):
    doc = {"memory_budget": 0.15, "swap_quantum": 0.1,
           "models": [{"path": models[n], "kv_cache_memory": KV_GIB} for n in ("alpha", "beta", "gamma")]}
    srv = ServerProcess(None, "--models", write_yaml(tmp_path / "models.yaml", doc), log_path=str(tmp_path / "log"))
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        names = ["alpha", "beta", "gamma"]

        def run(i: int) -> tuple[str, str | None, int]:
            stream = client.completions.create(model=names[i % 3], prompt=PROMPTS[i % 4], max_tokens=20 + i,
                                               temperature=0.8, seed=i, stream=True,
                                               stream_options={"include_usage": True})
            reason, tokens = None, 0
            for c in stream:
                if c.choices and c.choices[0].finish_reason:
                    reason = c.choices[0].finish_reason
                if c.usage is not None:
                    tokens = c.usage.completion_tokens
            return names[i % 3], reason, tokens

        with concurrent.futures.ThreadPoolExecutor(32) as ex:
            results = list(ex.map(run, range(32)))
        assert all(reason in ("stop", "length") and tokens > 0 for _, reason, tokens in results), results
        deadline = time.time() + 10
        while True:  # the last outputs' stats reach /metrics within a step
            m = srv.metrics()
            idle = all(m[f'tokenmill:num_requests_running{{model_name="{n}"}}'] == 0 for n in names)
            if idle or time.time() > deadline:
                break
            time.sleep(0.1)
        for n in names:
            assert m[f'tokenmill:num_requests_running{{model_name="{n}"}}'] == 0
            assert m[f'tokenmill:num_requests_waiting{{model_name="{n}"}}'] == 0
            assert m[f'tokenmill:kv_cache_usage_perc{{model_name="{n}"}}'] == 0
            done = sum(v for k, v in m.items() if k.startswith("tokenmill:request_success_total")
                       and f'model_name="{n}"' in k)
            assert done == sum(1 for name, _, _ in results if name == n)
        assert sum(v for k, v in m.items() if k.startswith("tokenmill:model_swaps_total")) > 0
        # Two of the three fit: alpha may be pinned, and a pinned model is neither parked nor unloaded.
        auth = {"Authorization": "Bearer unused"}
        r = httpx.post(f"{srv.base_url}/v1/models/alpha/pin", headers=auth, timeout=60)
        assert r.status_code == 200 and r.json() | {"state": "active", "pinned": True} == r.json()
        for name in ("beta", "gamma", "beta"):
            client.completions.create(model=name, prompt="Hi", max_tokens=2)
            assert states(srv)["alpha"] == "active"
        r = httpx.post(f"{srv.base_url}/v1/models/alpha/unload", headers=auth, timeout=30)
        assert r.status_code == 409 and "pinned" in r.json()["error"]["message"]
    finally:
        assert srv.stop() == 0


def test_several_model_flags_and_bad_pool_configs(models, tmp_path, capsys):
    from tokenmill.cli import main

    one = ServerProcess(models["alpha"], "--memory-budget", "0.05", log_path=str(tmp_path / "one.log"))
    try:  # one model with a budget: all of it is the model's (weights, then the KV cache)
        card = httpx.get(one.base_url + "/v1/models/alpha", timeout=10).json()
        assert card["state"] == "active" and card["size_bytes"] <= 0.05 * 2**30 < card["size_bytes"] + 2**20
    finally:
        one.stop()
    srv = ServerProcess(models["alpha"], "--model", models["beta"], "--kv-cache-memory", "0.03125",
                        log_path=str(tmp_path / "log"))
    try:
        data = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"]
        assert [(m["id"], m["state"]) for m in data] == [("alpha", "active"), ("beta", "active")]
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.json()["model"] == "alpha"  # no `model`: the first one
    finally:
        srv.stop()
    bad = [
        ({"models": [{"path": "missing"}]}, "models[0].path"),
        ({"models": [{"path": models["alpha"], "dtype": "float7"}]}, "models[0]"),
        ({"models": [{"path": models["alpha"], "colour": 1}]}, "models[0].colour"),
        ({"models": [{"path": models["alpha"], "memory_share": 0.5}]}, "memory_share: needs a memory_budget"),
        ({"models": [{"path": models["alpha"]}, {"path": models["alpha"]}]}, "names two models"),
        ({"models": [{"path": models["alpha"]}],
          "tiers": [{"name": "t", "route": {"policy": "cascade", "small": "alpha", "strong": "zeta",
                                            "threshold": -1}}]}, "tiers[0].route.strong"),
        ({"memory_budget": 0.01, "models": [{"path": models["alpha"], "kv_cache_memory": KV_GIB}]},
         "more than the whole --memory-budget"),
        ({"models": [{"path": models["alpha"], "enable_prefix_caching": "no"}]}, "models[0].enable_prefix_caching"),
        ({"models": [{"path": models["alpha"], "tool_call_parser": "bogus"}]}, "models[0].tool_call_parser"),
        ({"models": [{"path": models["alpha"], "reasoning_parser": "bogus"}]}, "models[0].reasoning_parser"),
        ({"models": [{"path": models["alpha"]}, {"path": models["beta"]}],
          "tiers": [{"name": "t", "route": {"policy": "rules", "default": "alpha"}},
                    {"name": "t", "route": {"policy": "rules", "default": "beta"}}]}, "tiers[1].name"),
        ({"models": [{"path": models["alpha"]}],
          "tiers": [{"name": "t", "route": {"policy": "cascade", "small": "alpha", "strong": "alpha",
                                            "threshold": -1}}]}, "tiers[0].route.strong"),
        ({"swap_quantum": -1, "models": [{"path": models["alpha"]}]}, "swap_quantum"),
        # A draft model is checked at startup too, not when its model is first asked for.
        ({"models": [{"path": models["alpha"]}, {"path": models["beta"], "speculative_config":
                                                  {"model": "missing", "num_speculative_tokens": 2}}]},
         "models[1]: speculative_config.model: "),
        ({"models": [{"path": models["alpha"], "speculative_config": True}]}, "models[0].speculative_config"),
    ]
    for i, (doc, needle) in enumerate(bad):
        path = write_yaml(tmp_path / f"bad{i}.yaml", doc)
        assert main(["serve", "--models", path, "--port", "0"]) == 2
        assert needle in capsys.readouterr().err, needle


def test_cli_models_file_relative_paths(models, tmp_path):
    from tokenmill.config import EngineConfig
    from tokenmill.server.models_file import read_models_file

    os.symlink(models["alpha"], tmp_path / "a")
    path = write_yaml(tmp_path / "m.yaml", {"models": [{"path": "a", "name": "first", "max_model_len": 128,
                                                          "pinned": True}]})
    entries, tiers, settings = read_models_file(path, EngineConfig(model=""))
    assert entries[0].name == "first" and entries[0].config.model == str(tmp_path / "a")
    assert entries[0].config.max_model_len == 128 and entries[0].pinned and tiers == [] and settings == {}
    # A draft model's folder is the file's too, given as an object or as a JSON string; `false`
    # turns off the command line's speculation for one model.
    os.symlink(models["beta"], tmp_path / "d")
    flags = EngineConfig(model="", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    path = write_yaml(tmp_path / "m.yaml", {"models": [
        {"path": "a", "name": "x", "speculative_config": {"model": "d", "num_speculative_tokens": 2}},
        {"path": "a", "name": "y", "speculative_config": '{"model": "d", "num_speculative_tokens": 2}'},
        {"path": "a", "name": "z", "speculative_config": False}, {"path": "a", "name": "w"}]})
    x, y, z, w = (e.config for e in read_models_file(path, flags)[0])
    assert x.speculative_config.model == y.speculative_config.model == str(tmp_path / "d")
    assert z.speculative_config is None and w.speculative_config.method == "ngram"
    # and `quantization: false` the command line's quantization
    flags = EngineConfig(model="", quantization="int8")
    path = write_yaml(tmp_path / "m.yaml", {"models": [{"path": "a", "name": "q", "quantization": False},
                                                       {"path": "a", "name": "r"}]})
    q, r = (e.config for e in read_models_file(path, flags)[0])
    assert q.quantization is None and r.quantization == "int8"
    path = write_yaml(tmp_path / "m.yaml", {"models": [{"path": "a", "quantization": True}]})
    with pytest.raises(ValueError, match=r"models\[0\]\.quantization: a method"):
        read_models_file(path, flags)


def test_every_model_is_checked_at_startup_as_its_engine_would_check_it(models, tmp_path):
    """A model that starts on disk is built only at its first request: everything its engine
    checks before loading weights is checked when the file is read (these passed, and failed
    that request after the active model had been pushed out for it)."""
    from tokenmill.config import EngineConfig
    from tokenmill.server.models_file import build_pool_config, read_models_file
    from tokenmill.server.pool import PoolConfig

    os.makedirs(tmp_path / "empty")
    bad = [({"attention_backend": "bogus"}, "attention_backend: unknown backend"),
           ({"tokenizer": str(tmp_path / "empty")}, "tokenizer: "),
           ({"task": "classify"}, "task: "),  # (a causal LM has no classification head)
           ({"classifier_from_token": ["not-one-token-at-all", "yes"]}, "classifier_from_token: "),
           ({"task": "embed", "speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
            "speculative_config: an embedding model generates nothing"),
           ({"task": "embed"}, "async_scheduling: 'on' does not work with an embedding model")]
    for i, (settings, needle) in enumerate(bad):
        doc = {"memory_budget": BUDGET_ONE, "models": [{"path": models["alpha"], "kv_cache_memory": KV_GIB},
                                                       {"path": models["beta"], "kv_cache_memory": KV_GIB,
                                                        **settings}]}
        path = write_yaml(tmp_path / f"bad{i}.yaml", doc)
        base = EngineConfig(model="", async_scheduling="on" if "async" in needle else "auto")  # (--async-scheduling)
        with pytest.raises(ValueError, match=r"models\[1\]: " + re.escape(needle)):
            read_models_file(path, base)
    # A cascade's models must generate: a tier over an embedding model is refused, naming the tier.
    doc = {"models": [{"path": models["alpha"]}, {"path": models["beta"], "task": "embed"}],
           "tiers": [{"name": "auto", "route": {"policy": "cascade", "small": "alpha", "strong": "beta",
                                                "threshold": -1}}]}
    entries, tiers, _ = read_models_file(write_yaml(tmp_path / "t.yaml", doc), EngineConfig(model=""))
    assert [e.task for e in entries] == ["generate", "embed"]
    with pytest.raises(ValueError, match=r"tiers\[0\]\.route\.strong: 'beta' is an embedding model"):
        build_pool_config(entries, tiers, PoolConfig())


def test_a_cascade_refuses_what_its_strong_model_cannot_take_before_the_small_one_runs(models):
    """A strong model with a shorter context than the small one: a request it could not take is a
    400 at once (it was one only after the small model had run and escalated)."""
    import asyncio
    from types import SimpleNamespace

    from tokenmill.routing import CascadePolicy
    from tokenmill.server.cascade import CascadeEngine

    started = []

    async def add_requests(reqs, **kw):
        started.extend(reqs)
        return SimpleNamespace(request_ids=[r[0] for r in reqs])

    pool = SimpleNamespace(entries={"strong": SimpleNamespace(max_model_len=16)})
    small = SimpleNamespace(engine=SimpleNamespace(engine=None, add_requests=add_requests))
    cascade = CascadeEngine(SimpleNamespace(pool=pool), "auto", CascadePolicy("small", "strong", -1.0),  # type: ignore
                            small, {})  # type: ignore[arg-type]
    for n, max_tokens, needle in ((16, 1, "prompt: 16 tokens leave no room"), (10, 8, "max_tokens: prompt (10")):
        with pytest.raises(ValueError, match=re.escape(needle) + ".*of `strong`, the strong model of the cascade"):
            asyncio.run(cascade.add_requests([("r", {"prompt_token_ids": [5] * n},
                                               SamplingParams(max_tokens=max_tokens))]))
    assert started == []
    asyncio.run(cascade.add_requests([("r", {"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=6))]))
    assert [r[0] for r in started] == ["r"]


def test_a_model_that_can_never_fit_is_not_a_503_to_retry(models):
    """Larger than the whole budget (it turned out so once loaded): a 500 no client should retry;
    one the pinned models leave no room for stays a 503, since unpinning one makes room."""
    import asyncio

    from tokenmill.config import EngineConfig
    from tokenmill.server.gateway import pool_api_error
    from tokenmill.server.pool import ACTIVE, ModelPool, ModelSpec, PoolConfig, PoolError

    mib = 2**20
    pool = ModelPool([ModelSpec("alpha", EngineConfig(model=models["alpha"]), pinned=True),
                      ModelSpec("beta", EngineConfig(model=models["beta"]))],
                     PoolConfig(memory_budget=100 * mib), lambda spec, front: None)
    alpha, beta = pool.entries["alpha"], pool.entries["beta"]
    alpha.state, alpha.weight_bytes, alpha.kv_bytes = ACTIVE, mib, 59 * mib
    for kv, status, retry in ((120 * mib, 500, {"x-should-retry": "false"}), (60 * mib, 503, {"Retry-After": "5"})):
        beta.weight_bytes, beta.kv_bytes = mib, kv
        with pytest.raises(PoolError) as e:
            asyncio.run(pool.acquire("beta"))
        err = pool_api_error(e.value)
        assert (err.status, err.headers) == (status, retry), err.message
        assert err.code == ("model_does_not_fit" if status == 500 else "model_unavailable")
        assert ("more than the whole --memory-budget" if status == 500 else "unpin one") in err.message


def test_a_draft_models_weights_count_in_the_estimate(models):
    """A model left on disk is brought back by its estimate: its draft model's weights are part of
    it (they were left out, and such a model then took more than --memory-budget)."""
    from tokenmill.config import EngineConfig
    from tokenmill.server.pool import _estimate_bytes

    plain = EngineConfig(model=models["alpha"], kv_cache_memory_bytes=2**20, prepack_weights=False)
    spec = dataclasses.replace(plain, speculative_config={"model": models["beta"], "num_speculative_tokens": 2})
    weights = sum(os.path.getsize(os.path.join(models["beta"], f)) for f in os.listdir(models["beta"])
                  if f.endswith(".safetensors"))
    assert abs(_estimate_bytes(spec) - _estimate_bytes(plain) - weights) < 0.01 * weights


def test_a_model_that_cannot_come_back_fails_its_requests_and_not_the_server(models, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_FAULT_UNPARK", "beta")
    doc = {"memory_budget": BUDGET_ONE, "swap_quantum": 0.1,
           "models": [{"path": models[n], "kv_cache_memory": KV_GIB} for n in ("alpha", "beta")],
           "tiers": [{"name": "auto", "route": {"policy": "cascade", "small": "alpha", "strong": "beta",
                                                "threshold": -0.0001, "window": 4}}]}
    srv = ServerProcess(None, "--models", write_yaml(tmp_path / "models.yaml", doc), log_path=str(tmp_path / "log"),
                        script=os.path.join(os.path.dirname(__file__), "fault_server.py"))
    try:
        t0 = time.time()
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "beta", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 503 and "could not be brought back" in r.json()["error"]["message"]
        assert time.time() - t0 < 10  # at once, not after --model-load-timeout
        cards = {m["id"]: m for m in httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"]}
        assert "no memory for the KV cache" in cards["beta"]["error"] and cards["alpha"]["error"] is None
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200 and httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
        # A cascade that escalates to it fails alike, streamed (an error event) or not (its code was null
        # in the stream).
        body = {"model": "auto", "prompt": "Hi", "max_tokens": 8, "temperature": 0}
        r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
        r = httpx.post(srv.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60)
        events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
        assert events[-1]["error"] | {"code": "model_unavailable", "type": "service_unavailable"} == \
            events[-1]["error"], r.text
        assert "could not be brought back" in events[-1]["error"]["message"]
    finally:
        srv.stop()


def test_a_model_that_cannot_be_parked_keeps_serving_and_the_other_waits_then_503s(models, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_FAULT_PARK", "alpha")
    doc = {"memory_budget": BUDGET_ONE, "swap_quantum": 0.1, "load_timeout": 2,
           "models": [{"path": models[n], "kv_cache_memory": KV_GIB} for n in ("alpha", "beta")]}
    srv = ServerProcess(None, "--models", write_yaml(tmp_path / "models.yaml", doc), log_path=str(tmp_path / "log"),
                        script=os.path.join(os.path.dirname(__file__), "fault_server.py"))
    try:
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "beta", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 503 and "was not brought back" in r.json()["error"]["message"]
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200 and states(srv) == {"alpha": "active", "beta": "parked"}
    finally:
        srv.stop()


def test_two_busy_models_with_long_prompts_both_finish(models, tmp_path):
    """Taking turns must not starve: a model is not parked while its preempted sequences are
    still recomputing what they had, so each turn makes progress even with no quantum at all."""
    doc = {"memory_budget": BUDGET_ONE, "swap_quantum": 0,
           "models": [{"path": models[n], "kv_cache_memory": KV_GIB, "max_num_batched_tokens": 32}
                      for n in ("alpha", "beta")]}
    srv = ServerProcess(None, "--models", write_yaml(tmp_path / "models.yaml", doc), log_path=str(tmp_path / "log"))
    try:
        prompt = [(7 * i) % 500 + 1 for i in range(200)]

        def run(name: str) -> int:
            r = httpx.post(srv.base_url + "/v1/completions", timeout=120, json={
                "model": name, "prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True})
            return r.json()["usage"]["completion_tokens"]

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            assert list(ex.map(run, ["alpha", "beta", "alpha", "beta"])) == [30] * 4
    finally:
        srv.stop()


def test_startup_leaves_on_disk_what_neither_budget_holds_and_tokenizes_it_there(models, tmp_path):
    doc = {"memory_budget": BUDGET_ONE, "host_memory_budget": 0.0001,
           "models": [{"path": models[n], "kv_cache_memory": KV_GIB} for n in ("alpha", "beta", "gamma")]}
    shutil.copytree(models["alpha"], tmp_path / "broken")  # (its weights go bad once the server runs)
    broken = {**doc, "models": [*doc["models"], {"path": str(tmp_path / "broken"), "kv_cache_memory": KV_GIB}]}
    srv = ServerProcess(None, "--models", write_yaml(tmp_path / "models.yaml", broken), log_path=str(tmp_path / "log"))
    try:
        assert states(srv) == {"alpha": "active", "beta": "on_disk", "gamma": "on_disk", "broken": "on_disk"}
        assert "dropped to disk" not in srv.log()  # never built, not built and dropped
        r = httpx.post(srv.base_url + "/tokenize", json={"model": "gamma", "prompt": "Hello"}, timeout=30)
        assert r.status_code == 200 and r.json()["count"] > 0 and r.json()["max_model_len"] > 0
        # Its card's context is the one its engine will have (it was null until it loaded).
        card = httpx.get(srv.base_url + "/v1/models/gamma", timeout=10).json()
        assert card["max_model_len"] == r.json()["max_model_len"] == 1024
        r = httpx.post(srv.base_url + "/detokenize", json={"model": "gamma", "tokens": r.json()["tokens"]}, timeout=30)
        assert r.status_code == 200 and r.json()["prompt"].endswith("Hello")
        assert states(srv)["gamma"] == "on_disk"  # its tokenizer answered from its folder
        # A load that fails answers its request with a 503 and is not tried again for no one: the
        # request's demand, given back on the event loop after the failure, started a second load.
        (tmp_path / "broken" / "model.safetensors").write_bytes(b"garbage")
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "broken", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"], r.text
        time.sleep(0.5)
        assert srv.log().count("model broken: loading from") == 1
        assert states(srv)["broken"] == "on_disk"
    finally:
        srv.stop()
    # Host memory holds parked weights: one whose KV cache alone exceeds it still parks there (the
    # check added the whole estimate, weights and KV cache, and left the model on disk).
    doc["host_memory_budget"] = 0.01
    srv = ServerProcess(None, "--models", write_yaml(tmp_path / "models.yaml", doc), log_path=str(tmp_path / "log2"))
    try:
        assert states(srv) == {"alpha": "active", "beta": "parked", "gamma": "parked"}
    finally:
        srv.stop()


def test_models_are_built_and_stepped_on_one_thread_and_a_background_load_thread_ends(models, tmp_path, monkeypatch):
    """libgomp keeps an OpenMP worker pool per thread that ran a parallel region, while that thread
    lives; with more workers than CPUs it stops spin-waiting, which made every step of a model built
    on the main thread and stepped on the engine thread about 1.5x slower on 2 CPUs. So the startup
    models are built on the engine thread, and a later load runs on a thread that then ends."""
    trace = tmp_path / "threads"
    monkeypatch.setenv("TOKENMILL_FAULT_TRACE_THREADS", str(trace))
    doc = {"memory_budget": BUDGET_ONE, "host_memory_budget": 0.0001,
           "models": [{"path": models[n], "kv_cache_memory": KV_GIB} for n in ("alpha", "beta")]}
    log = tmp_path / "log"
    srv = ServerProcess(None, "--models", write_yaml(tmp_path / "models.yaml", doc), log_path=str(log),
                        script=os.path.join(os.path.dirname(__file__), "fault_server.py"))
    try:
        for name in ("alpha", "beta", "alpha"):
            r = httpx.post(srv.base_url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2},
                           timeout=120)
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
    lines = trace.read_text().splitlines()
    assert lines[0] == "build alpha on tokenmill-engine", lines
    assert "step alpha on tokenmill-engine" in lines and "build beta on tokenmill-load-beta" in lines, lines
    assert all(ln.endswith("on tokenmill-engine") for ln in lines if ln.startswith("step")), lines


def test_unloading_a_model_while_it_loads_is_a_409(models):
    """A load runs to its end: an unload that answered 200 meanwhile left the model active after all."""
    from tokenmill.config import EngineConfig
    from tokenmill.server.pool import LOADING, ModelPool, ModelSpec, PoolConfig, PoolError

    pool = ModelPool([ModelSpec("alpha", EngineConfig(model=models["alpha"]))], PoolConfig(), lambda spec, front: None)
    pool.entries["alpha"].state = LOADING
    for to_disk in (False, True):
        with pytest.raises(PoolError, match="is loading") as e:
            pool.unload("alpha", to_disk)
        assert e.value.status == 409 and pool.entries["alpha"].state == LOADING


def test_a_models_counters_never_go_back_when_its_engine_is_let_go(models):
    """A model dropped to disk and loaded again gets a new engine whose counters start at zero: the
    metrics carry the old engine's (Prometheus reads a counter that goes down as a restart)."""
    from types import SimpleNamespace

    from tokenmill.config import EngineConfig
    from tokenmill.server.async_engine import EngineStats
    from tokenmill.server.pool import ModelPool, ModelSpec, PoolConfig

    pool = ModelPool([ModelSpec("alpha", EngineConfig(model=models["alpha"]))], PoolConfig(), lambda spec, front: None)
    e = pool.entries["alpha"]

    def stats() -> EngineStats:
        return pool.model_stats()[0][1]

    e.front = SimpleNamespace(stats=EngineStats(num_requests_running=2, num_preemptions=3, prefix_cache_hits=40,
                                                energy_joules=1.5, energy_source="model", idle_energy_joules=10.0))
    assert (stats().num_preemptions, stats().num_requests_running) == (3, 2)
    pool._let_go(e)  # (dropped to disk)
    s = stats()
    assert (s.num_preemptions, s.prefix_cache_hits, s.energy_joules, s.energy_source) == (3, 40, 1.5, "model")
    assert s.num_requests_running == 0  # (gauges are the engine's own)
    e.front = SimpleNamespace(stats=EngineStats(num_preemptions=1, prefix_cache_hits=2, energy_joules=0.25,
                                                energy_source="model", idle_energy_joules=12.0))
    s = stats()
    assert (s.num_preemptions, s.prefix_cache_hits, s.energy_joules) == (4, 42, 1.75)
    assert s.idle_energy_joules == 12.0  # (the meter's, the process's: not summed over engines)
