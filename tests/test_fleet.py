"""The fleet router with real processes on 127.0.0.1: two `tokenmill serve` replicas and
`tokenmill router` over them, driven with the official openai client.

Covers the replicas' side (KV events, resume_token_ids, return_token_ids) and the router's:
KV-aware routing to the replica holding a prefix, a replica SIGKILLed mid-stream with the stream
finishing on the other with identical greedy text, the killed replica used again once it is back,
and the router's SIGTERM letting streams in flight finish.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.server_utils import ROOT, ServerProcess
from tokenmill.router.index import PromptHasher

REPLICA_ARGS = ("--kv-cache-memory", "0.02", "--log-level", "warning")
HEADER = "x-tokenmill-replica"


def router_metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def wait_fleet(router: ServerProcess, replicas: list[str], timeout: float = 60.0) -> None:
    """Until the router sees every replica up with its KV events connected."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = router_metrics(router.base_url)
        if all(m.get(f'tokenmill_router:replica_up{{replica="{u}"}}') == 1 and
               m.get(f'tokenmill_router:replica_kv_events_synced{{replica="{u}"}}') == 1 for u in replicas):
            return
        time.sleep(0.1)
    raise AssertionError(f"fleet not ready: {router_metrics(router.base_url)}")


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    reps = [ServerProcess(model_dir, *REPLICA_ARGS, log_path=str(d / f"r{i}.log"), env={"OMP_NUM_THREADS": "1"})
            for i in range(2)]
    router = ServerProcess(None, *[a for r in reps for a in ("--replica", r.base_url)], "--health-interval", "0.2",
                           "--health-timeout", "5", log_path=str(d / "router.log"), command="router")
    wait_fleet(router, [r.base_url for r in reps])
    state = {"replicas": reps, "router": router, "dir": d}
    yield state
    router.stop()
    for r in state["replicas"]:
        r.stop()


def faulty_pair(model_dir: str, good: ServerProcess, tmp_path, fault_env: dict[str, str]):
    """A replica with injected faults (tests/fault_server.py; seed 666 fails in the engine, plus
    fault_env) and a round-robin router over it and `good`, ready."""
    bad = ServerProcess(model_dir, *REPLICA_ARGS, log_path=str(tmp_path / "bad.log"),
                        script=os.path.join(ROOT, "tests", "fault_server.py"),
                        env={"OMP_NUM_THREADS": "1", **fault_env})
    router = ServerProcess(None, "--replica", bad.base_url, "--replica", good.base_url, "--health-interval", "0.2",
                           "--health-timeout", "5", "--policy", "round_robin", log_path=str(tmp_path / "router.log"),
                           command="router")
    wait_fleet(router, [bad.base_url, good.base_url])
    return bad, router


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


# -- the replica's side ----------------------------------------------------------------------------
def test_kv_events_publish_the_keys_a_router_computes(fleet, model_dir, model_name):
    rep = fleet["replicas"][0]
    prompt = "kv events carry the engine's block keys " * 4
    ids = PromptHasher(model_dir).token_ids("completions", {"prompt": prompt})
    with httpx.Client(timeout=30) as http, http.stream("GET", rep.base_url + "/v1/kv_events") as r:
        lines = r.iter_lines()
        hello = json.loads(next(lines)[6:])
        assert hello["type"] == "hello" and model_name in hello["models"]
        bs = hello["models"][model_name]
        want = {k.hex() for k in PromptHasher.keys(ids, bs, None)}
        client_for(rep.base_url).completions.create(model=model_name, prompt=prompt, max_tokens=2)
        seen: set[str] = set()
        loads = 0
        deadline = time.time() + 20
        for line in lines:
            assert time.time() < deadline, "no stored event for the prompt"
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev["type"] == "snapshot":
                seen |= set(ev["hashes"])
            elif ev["type"] == "events":
                for op in ev["ops"]:
                    if op[0] == "stored":
                        seen |= set(op[1])
            elif ev["type"] == "load":
                loads += 1
            if want <= seen and loads:
                break


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.95, "seed": 11}],
                         ids=["greedy", "seeded"])
def test_resume_token_ids_continue_a_stream_exactly(fleet, model_name, endpoint, sampling):
    """What one replica streamed up to token k, then another's stream resumed there, is the
    undisturbed stream: same text, same token ids, usage counting all of them."""
    a, b = (client_for(r.base_url) for r in fleet["replicas"])
    common = dict(model=model_name, max_tokens=48, stream=True, stream_options={"include_usage": True},
                  **sampling, extra_body={"ignore_eos": True, "return_token_ids": True})

    def run(c: openai.OpenAI, **extra) -> tuple[list[tuple[str, list[int]]], dict]:
        """(text, token ids) of every chunk, and the usage."""
        kw = {**common, "extra_body": {**common["extra_body"], **extra}}
        if endpoint == "chat":
            stream = c.chat.completions.create(messages=[{"role": "user", "content": "tell me a story"}], **kw)
        else:
            stream = c.completions.create(prompt="Once upon a time", **kw)
        chunks, usage, pids = [], {}, None
        for ch in stream:
            if ch.usage:
                usage = ch.usage.model_dump()
            if not chunks and ch.choices:  # the prompt's ids come first, in a resumed stream too
                pids = (ch.model_extra if endpoint == "chat" else ch.choices[0].model_extra).get("prompt_token_ids")
            for c_ in ch.choices:
                chunks.append(((c_.delta.content or "") if endpoint == "chat" else c_.text,
                               c_.model_extra.get("token_ids") or []))
        return chunks, {**usage, "prompt_token_ids": pids}

    chunks, usage = run(a)
    text, ids = "".join(t for t, _ in chunks), [i for _, x in chunks for i in x]
    assert len(ids) == 48 and usage["completion_tokens"] == 48
    # the client had the chunks up to token 17 when the first replica went away
    head, head_ids = "", []
    for t, x in chunks:
        if len(head_ids) >= 17:
            break
        head, head_ids = head + t, head_ids + x
    tail_chunks, usage2 = run(b, resume_token_ids=head_ids)
    assert head_ids + [i for _, x in tail_chunks for i in x] == ids
    # text held back at the cut (a partial character, a possible stop string) comes with the resumed stream
    assert head + "".join(t for t, _ in tail_chunks) == text
    assert usage2["completion_tokens"] == 48 and usage2["prompt_tokens"] == usage["prompt_tokens"]
    assert len(usage["prompt_token_ids"]) == usage["prompt_tokens"]
    assert usage2["prompt_token_ids"] == usage["prompt_token_ids"]  # (what a router counts the prompt by)


def test_resume_with_min_tokens_and_a_stop_string_before_it(fleet, model_name):
    """A stop string that appears before min_tokens does not count: the resumed stream must not cut
    the text there (it would send part of it again)."""
    a, b = (client_for(r.base_url) for r in fleet["replicas"])
    base = dict(model=model_name, prompt="Once upon a time", max_tokens=40, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    text = a.completions.create(**base).choices[0].text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip() and
                text[i:i + 2] in text[:i + 2] and text.find(text[i:i + 2]) < len(text) // 3)
    kw = {**base, "stop": [stop], "stream": True, "extra_body": {**base["extra_body"], "min_tokens": 30}}
    chunks = [(c.text, c.model_extra["token_ids"]) for ch in a.completions.create(**kw) for c in ch.choices]
    full = "".join(t for t, _ in chunks)
    head, ids = "", []
    for t, x in chunks:
        if len(ids) >= 20:
            break
        head, ids = head + t, ids + x
    kw["extra_body"] = {**kw["extra_body"], "resume_token_ids": ids}
    tail = "".join(c.text for ch in b.completions.create(**kw) for c in ch.choices)
    assert head + tail == full


def test_resume_refusals_are_400(fleet, model_name):
    c = client_for(fleet["replicas"][0].base_url)
    for kw, param in [(dict(stream=False), "resume_token_ids"), (dict(stream=True, n=2), "resume_token_ids")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=model_name, prompt="hi", max_tokens=8, extra_body={"resume_token_ids": [5]},
                                 **kw)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="nothing to generate"):
        list(c.completions.create(model=model_name, prompt="hi", max_tokens=2, stream=True,
                                  extra_body={"resume_token_ids": [5, 6]}))


# -- the router --------------------------------------------------------------------------------------
def test_router_lists_models_and_relays_errors(fleet, model_name):
    router = fleet["router"]
    c = client_for(router.base_url)
    assert [m.id for m in c.models.list().data] == [model_name]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    r = httpx.post(router.base_url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model=model_name, prompt="hi", max_tokens=10**6, stream=True)
    r = httpx.get(router.base_url + "/v1/kv_events", timeout=10)
    assert r.status_code == 404
    assert httpx.get(router.base_url + "/health", timeout=10).json()["replicas_up"] == 2


def test_router_dashboard_shows_every_replica(fleet, model_name):
    """/dashboard/data through the router: both replicas' series, each labelled with its replica, and
    a poll of the router's dashboard is not a routed request (decisions and latencies leave it out)."""
    router = fleet["router"]
    client_for(router.base_url).completions.create(model=model_name, prompt="hello", max_tokens=2)
    assert httpx.get(router.base_url + "/dashboard", timeout=10).status_code == 200
    before = router_metrics(router.base_url)
    data = httpx.get(router.base_url + "/dashboard/data", timeout=10).json()
    after = router_metrics(router.base_url)
    replicas = {s["labels"]["replica"] for s in data["series"]["tokenmill:num_requests_running"]}
    assert replicas == {r.base_url for r in fleet["replicas"]}
    assert sum(s["value"] for s in data["series"]["tokenmill:request_success_total"]) >= 1
    for k in after:
        if "routing_decisions" in k or "e2e_request_latency_seconds_count" in k:
            assert after[k] == before.get(k), k


def test_router_answers_a_wrong_method_itself_and_works_behind_a_root_path(fleet, model_name, tmp_path):
    router = fleet["router"]

    def relayed() -> float:
        return sum(v for k, v in router_metrics(router.base_url).items() if k.startswith("tokenmill_router:requests"))

    before = relayed()
    for method, path, allow in [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
                                ("POST", "/v1/models", "GET"), ("DELETE", "/health", "GET")]:
        r = httpx.request(method, router.base_url + path, timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.status_code)
        assert r.json()["error"]["message"] == "Method Not Allowed"
    assert relayed() == before  # answered by the router, no replica asked
    r = httpx.get(router.base_url + "/tokenize", timeout=10)  # a replica's path: its 405, relayed whole
    assert r.status_code == 405 and r.headers["allow"] == "POST" and relayed() == before + 1
    # A trailing slash is redirected as a replica does it, to the router's own path, not a replica's.
    body = {"model": model_name, "prompt": "hi", "max_tokens": 2}
    r = httpx.post(router.base_url + "/v1/completions/", json=body, timeout=30)
    assert r.status_code == 307 and r.headers["location"] == router.base_url + "/v1/completions"
    r = httpx.post(router.base_url + "/v1/completions/", json=body, timeout=30, follow_redirects=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    r = httpx.post(router.base_url + "/tokenize/", json={"model": model_name, "prompt": "hi"}, timeout=30)
    assert r.status_code == 307 and r.headers["location"] == "/tokenize"  # (was the replica's address)

    # Behind a proxy that strips /api (uvicorn's root_path): replicas are called without the prefix.
    urls = [r.base_url for r in fleet["replicas"]]
    proxied = ServerProcess(None, *[a for u in urls for a in ("--replica", u)], "--root-path", "/api",
                            log_path=str(tmp_path / "router.log"), command="router")
    try:
        wait_fleet(proxied, urls)
        c = client_for(proxied.base_url)
        out = c.completions.create(model=model_name, prompt="hello", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
        chunks = list(c.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert httpx.get(proxied.base_url + "/openapi.json", timeout=10).json()["servers"] == [{"url": "/api"}]
    finally:
        proxied.stop()


def test_a_stored_response_is_continued_on_its_replica(fleet, model_name, tmp_path):
    """The Responses API through the router: a conversation's turns go to the replica holding it
    (streamed or not), GET and DELETE too, and a router that never saw it asks the replicas."""
    router = fleet["router"]
    raw = client_for(router.base_url).responses.with_raw_response
    first = raw.create(model=model_name, input="hi", max_output_tokens=2)
    home, prev = first.headers[HEADER], first.parse().id
    for i in range(3):
        turn = raw.create(model=model_name, input=f"turn {i}", previous_response_id=prev, max_output_tokens=2,
                          stream=i == 1)
        assert turn.headers[HEADER] == home
        prev = list(turn.parse())[-1].response.id if i == 1 else turn.parse().id
    got = raw.retrieve(prev)
    assert got.headers[HEADER] == home and got.parse().previous_response_id is not None
    urls = [r.base_url for r in fleet["replicas"]]
    fresh = ServerProcess(None, *[a for u in urls for a in ("--replica", u)], log_path=str(tmp_path / "router.log"),
                          command="router")
    try:
        wait_fleet(fresh, urls)
        c = client_for(fresh.base_url)
        turn = c.responses.with_raw_response.create(model=model_name, input="again", previous_response_id=prev,
                                                    max_output_tokens=2)
        assert turn.headers[HEADER] == home and turn.parse().usage.input_tokens > first.parse().usage.input_tokens
        assert c.responses.input_items.list(turn.parse().id).data[0].content[0].text == "again"
        counted = c.responses.input_tokens.count(model=model_name, input="again", previous_response_id=prev)
        assert counted.input_tokens == turn.parse().usage.input_tokens  # (counted where the conversation is)
        c.responses.delete(prev)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(prev)
    finally:
        fresh.stop()


def test_kv_aware_sends_a_request_to_the_replica_holding_its_prefix(fleet, model_name):
    router = fleet["router"]
    c = client_for(router.base_url)
    system = "You answer questions about the tokenmill fleet router and nothing else. " * 4

    def ask(i: int, sys_prompt: str) -> tuple[str, int]:
        raw = c.chat.completions.with_raw_response.create(
            model=model_name, max_tokens=2,
            messages=[{"role": "system", "content": sys_prompt}, {"role": "user", "content": f"question {i}"}])
        return raw.headers[HEADER], raw.parse().usage.prompt_tokens_details.cached_tokens

    holder, _ = ask(0, system)
    time.sleep(0.3)  # the replica's KV events reach the router
    for i in range(1, 7):
        rep, cached = ask(i, system)
        assert rep == holder, f"request {i} went to {rep}, not to {holder} which holds its prefix"
        assert cached > 0
    other = "A different system prompt about something else entirely, long enough to fill blocks. " * 4
    first_other, _ = ask(100, other)
    time.sleep(0.3)
    assert all(ask(100 + i, other)[0] == first_other for i in range(1, 4))
    m = router_metrics(router.base_url)
    assert m['tokenmill_router:routing_decisions_total{policy="kv_aware",reason="prefix"}'] >= 9
    assert m["tokenmill_router:predicted_cached_tokens_total"] > 0


def test_sigkill_mid_stream_finishes_on_the_other_replica_then_it_comes_back(fleet, model_name):
    router = fleet["router"]
    reps = {r.base_url: r for r in fleet["replicas"]}
    c = client_for(router.base_url)
    kw = dict(model=model_name, prompt="The fleet keeps going when", max_tokens=300, temperature=0,
              extra_body={"ignore_eos": True})
    with c.completions.with_streaming_response.create(stream=True, stream_options={"include_usage": True},
                                                      **kw) as resp:
        victim = reps[resp.headers[HEADER]]
        text, chunks, usage, failover = "", 0, None, None
        for ch in resp.parse():
            chunks += 1
            if chunks == 20:
                victim.proc.send_signal(signal.SIGKILL)
            for c_ in ch.choices:
                text += c_.text
            failover = (ch.model_extra or {}).get("failover") or failover
            usage = ch.usage or usage
    survivor = next(r for r in reps.values() if r is not victim)
    want = client_for(survivor.base_url).completions.create(**kw).choices[0].text
    assert text == want  # no token lost, none repeated
    assert usage.completion_tokens == 300
    assert failover is not None and failover["resumed_at_token"] >= 19
    assert failover["replicas"] == [victim.base_url, survivor.base_url]
    m = router_metrics(router.base_url)
    assert m['tokenmill_router:failovers_total{outcome="resumed",phase="mid_stream"}'] == 1
    assert m[f'tokenmill_router:replica_up{{replica="{victim.base_url}"}}'] == 0
    # requests go on while it is down
    assert c.completions.create(model=model_name, prompt="still here", max_tokens=2).choices[0].text is not None
    # it comes back on the same address and gets work again
    back = ServerProcess(_model_dir(victim), *REPLICA_ARGS, log_path=victim.log_path + ".2", port=victim.port,
                         env={"OMP_NUM_THREADS": "1"})
    fleet["replicas"] = [back if r is victim else r for r in fleet["replicas"]]
    wait_fleet(router, [r.base_url for r in fleet["replicas"]])
    # Prompts shorter than a KV block (16 tokens): no prefix for kv_aware to follow. (Prompts sharing a
    # full block all go to the replica that cached the first, the survivor as often as not; they only
    # spread while its load report still counts the last one running.) With equal loads the turn
    # decides, so of two requests in a row one goes to each replica.
    used = {c.completions.with_raw_response.create(model=model_name, prompt=f"fresh {i}",
                                                   max_tokens=2).headers[HEADER] for i in range(6)}
    assert back.base_url in used, {k: v for k, v in router_metrics(router.base_url).items() if "replica" in k}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_replica_dying_before_the_first_token_is_retried_elsewhere(fleet, model_dir, model_name, tmp_path, stream):
    """A replica that crashes on a request before answering anything: the router sends the request
    to the other replica, and the client gets the answer (the same text: seeded sampling)."""
    good = fleet["replicas"][0]
    bad, router = faulty_pair(model_dir, good, tmp_path, {"TOKENMILL_FAULT_DIE_SEED": "4242"})
    try:
        c = client_for(router.base_url)
        kw = dict(model=model_name, prompt="A crash before the first token", max_tokens=12, temperature=1.0,
                  seed=4242, extra_body={"ignore_eos": True})
        want = client_for(good.base_url).completions.create(**kw).choices[0].text
        moved = []
        for _ in range(4):  # round robin: one of these reaches the bad replica
            if stream:
                text, fo = "", None
                for ch in c.completions.create(stream=True, **kw):
                    text += "".join(x.text for x in ch.choices)
                    fo = (ch.model_extra or {}).get("failover") or fo
            else:
                r = c.completions.create(**kw)
                text, fo = r.choices[0].text, (r.model_extra or {}).get("failover")
            assert text == want
            if fo is not None:
                moved.append(fo)
            if bad.proc.poll() is not None and moved:
                break
        assert bad.proc.poll() is not None, "the faulty replica never got the request"
        assert moved and moved[0]["replicas"] == [bad.base_url, good.base_url]
        m = router_metrics(router.base_url)
        # (a stream's replica may die before or after it sent the response's headers)
        assert sum(v for k, v in m.items() if k.startswith("tokenmill_router:failovers_total")
                   and ("resumed" in k or "retried" in k)) == 1
    finally:
        router.stop()
        bad.stop()


def test_a_hung_replica_mid_stream_is_given_up_on(fleet, model_name, tmp_path):
    """A replica that stops answering (SIGSTOP) mid-stream: once it has failed 3 health checks, its
    streams move on and finish on the other replica, text identical."""
    reps = fleet["replicas"]
    router = ServerProcess(None, *[a for r in reps for a in ("--replica", r.base_url)], "--health-interval", "0.2",
                           "--health-timeout", "0.5", log_path=str(tmp_path / "router.log"), command="router")
    c = client_for(router.base_url)
    kw = dict(model=model_name, prompt="A replica that hangs", max_tokens=200, temperature=0,
              extra_body={"ignore_eos": True})
    try:
        wait_fleet(router, [r.base_url for r in reps])
        with c.completions.with_streaming_response.create(stream=True, **kw) as resp:
            victim = next(r for r in reps if r.base_url == resp.headers[HEADER])
            text, n, failover = "", 0, None
            for ch in resp.parse():
                n += 1
                if n == 10:
                    victim.proc.send_signal(signal.SIGSTOP)
                text += "".join(x.text for x in ch.choices)
                failover = (ch.model_extra or {}).get("failover") or failover
        victim.proc.send_signal(signal.SIGCONT)
        other = next(r for r in reps if r is not victim)
        assert text == client_for(other.base_url).completions.create(**kw).choices[0].text
        assert failover is not None and failover["replicas"] == [victim.base_url, other.base_url]
    finally:
        for r in reps:
            r.proc.send_signal(signal.SIGCONT)
        router.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_an_engine_failure_on_one_replica_is_retried_on_another(fleet, model_dir, model_name, tmp_path, stream):
    """A replica whose engine fails a request (a fault injected for requests seeded 666) answers with
    an engine error; the router tries the request on another replica, where it succeeds."""
    good = fleet["replicas"][0]
    bad, router = faulty_pair(model_dir, good, tmp_path, {})
    try:
        c = client_for(router.base_url)
        kw = dict(model=model_name, prompt="An engine fault", max_tokens=8, temperature=1.0, seed=666,
                  extra_body={"ignore_eos": True})
        want = client_for(good.base_url).completions.create(**kw).choices[0].text
        for _ in range(2):  # round robin: one of them goes to the faulty replica first
            if stream:
                text = "".join(x.text for ch in c.completions.create(stream=True, **kw) for x in ch.choices)
            else:
                text = c.completions.create(**kw).choices[0].text
            assert text == want
        m = router_metrics(router.base_url)
        assert sum(v for k, v in m.items() if k.startswith("tokenmill_router:failovers_total")
                   and ("resumed" in k or "retried" in k)) == 1
        assert bad.proc.poll() is None  # it lives on, serving others
    finally:
        router.stop()
        bad.stop()


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}]


def test_a_replica_dying_after_part_of_a_step_is_impossible(fleet, model_dir, model_name, tmp_path):
    """A chat step can be several chunks (a tool call's header, then its first arguments) and the
    router resumes after every token of the chunks it relayed: a replica writes a step's chunks in
    one message, so one that dies right after writing the tool call's header has sent its
    arguments too, and the client's call is whole (it lost `{"` when the header went alone)."""
    good = fleet["replicas"][0]
    bad, router = faulty_pair(model_dir, good, tmp_path, {"TOKENMILL_FAULT_DIE_AFTER_SSE": '"tool_calls"'})
    try:
        kw = dict(model=model_name, messages=[{"role": "user", "content": "The weather?"}], max_tokens=24,
                  temperature=0, tools=WEATHER, tool_choice={"type": "function", "function": {"name": "get_weather"}})

        def call(url: str) -> tuple[list[str], str, str | None]:
            names, args, finish = [], "", None
            for ch in client_for(url).chat.completions.create(stream=True, **kw):
                for c in ch.choices:
                    for t in c.delta.tool_calls or []:
                        names += [t.function.name] if t.function.name else []
                        args += t.function.arguments or ""
                    finish = c.finish_reason or finish
            return names, args, finish

        want = call(good.base_url)
        assert want[0] == ["get_weather"] and want[1].startswith("{")
        for _ in range(2):  # round robin: one of them reaches the faulty replica
            assert call(router.base_url) == want
        assert bad.proc.poll() is not None, "the faulty replica never got the request"
    finally:
        router.stop()
        bad.stop()


def _model_dir(srv: ServerProcess) -> str:
    args = srv.proc.args
    return args[args.index("--model") + 1]


def test_router_sigterm_lets_streams_in_flight_finish(fleet, model_name, tmp_path):
    reps = fleet["replicas"]
    router = ServerProcess(None, *[a for r in reps for a in ("--replica", r.base_url)], log_path=str(tmp_path / "log"),
                           command="router")
    wait_fleet(router, [r.base_url for r in reps])
    c = client_for(router.base_url)
    stream = c.completions.create(model=model_name, prompt="Draining", max_tokens=150, temperature=0, stream=True,
                                  stream_options={"include_usage": True},
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    ids, n, usage = [], 0, None
    for ch in stream:  # (a chunk may carry several tokens when the client reads slower than they come)
        n += 1
        if n == 5:
            router.signal(signal.SIGTERM)
        for c_ in ch.choices:
            ids += c_.model_extra["token_ids"]
        usage = ch.usage or usage
    assert len(ids) == 150 and usage.completion_tokens == 150
    assert router.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(router.base_url + "/health", timeout=5)


def test_router_with_local_replicas_restarts_one_that_dies(model_dir, model_name, tmp_path):
    """`tokenmill router --replicas 2 --model DIR ...`: the router starts two replicas (the serve
    flags go to them), restarts one that dies, and stops both with itself."""
    import re

    logs = tmp_path / "replicas"
    router = ServerProcess(model_dir, "--replicas", "2", "--replica-threads", "1", "--replica-log-dir", str(logs),
                           "--health-interval", "0.2", "--health-timeout", "5", "--kv-cache-memory", "0.02",
                           log_path=str(tmp_path / "router.log"), command="router")
    log0 = logs / "replica0.log"
    try:
        urls = sorted({k.split('"')[1] for k in router_metrics(router.base_url) if "replica_up{" in k})
        assert len(urls) == 2
        wait_fleet(router, urls)
        c = client_for(router.base_url)
        r = c.completions.create(model=model_name, prompt="local replicas", max_tokens=3)
        assert r.usage.completion_tokens == 3
        pid = int(re.search(r"Started server process \[(\d+)\]", log0.read_text()).group(1))
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 90
        while log0.read_text().count("Started server process") < 2:  # restarted, on the same address
            assert time.time() < deadline, "the replica was not restarted"
            time.sleep(0.2)
        wait_fleet(router, urls, timeout=90)
        assert c.completions.create(model=model_name, prompt="after the restart", max_tokens=3).choices
    finally:
        assert router.stop() == 0
    for u in urls:  # stopped with the router
        with pytest.raises(httpx.ConnectError):
            httpx.get(u + "/health", timeout=2)
