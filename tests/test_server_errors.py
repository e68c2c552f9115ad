"""Bad input, limits, engine faults, fuzzed bodies and shutdown, against real server processes."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import ServerProcess

KEY = "sk-test"
NAME = "custom-name"
MAX_LEN = 128


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Tight limits, an API key, and an injected fault for requests seeded 666 (tests/fault_server.py)."""
    log = str(tmp_path_factory.mktemp("errors") / "server.log")
    srv = ServerProcess(model_dir, "--max-model-len", str(MAX_LEN), "--max-body-size", "65536", "--max-queue", "2",
                        "--max-num-seqs", "2", "--served-model-name", NAME, "--api-key", KEY,
                        "--kv-cache-memory", "0.01", log_path=log, script="tests/fault_server.py")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


COMPLETION = {"model": NAME, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"temperature": -1}, "temperature"),
    ("/v1/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"top_k": -5}, "top_k"),
    ("/v1/completions", {"min_p": 2.0}, "min_p"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 100000}, "n"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"max_tokens": "a"}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/completions", {"stream": "yes"}, "stream"),
    ("/v1/completions", {"stop": [""]}, "stop"),
    ("/v1/completions", {"stop": 5}, "stop"),
    ("/v1/completions", {"seed": 2**70}, "seed"),
    ("/v1/completions", {"stop": ["x"] * 129}, "stop"),
    ("/v1/completions", {"stop": ["x" * 1025]}, "stop"),
    ("/v1/chat/completions", {"stop_token_ids": [1] * 1025}, "stop_token_ids"),
    ("/v1/completions", {"logprobs": 100000}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"temperature": 10**400}, "temperature"),
    ("/v1/completions", {"prompt": [[5]] * 400, "n": 2}, "prompt"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"min_tokens": 10}, "min_tokens"),
    ("/v1/completions", {"priority": "high"}, "priority"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [100000]}, "prompt_token_ids"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"1_0": 1.0}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {str(t): 1 for t in range(1025)}}, "logit_bias"),
    ("/v1/completions", {"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"max_completion_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools[0]"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    # This model's chat template shows no tool-call format, so "auto" calls could not be found.
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_invalid_parameters_are_400_naming_the_parameter(http, path, body, param):
    base = COMPLETION if path == "/v1/completions" else CHAT
    _error(http.post(path, json={**base, **body}), 400, param)


def test_max_queue_holds_when_the_kv_cache_is_what_is_full(model_dir, tmp_path):
    """When the KV cache (not max_num_seqs) is what limits the batch, free batch places seat nothing:
    a burst is refused beyond what the free blocks hold and --max-queue waiting sequences."""
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.0006", "--max-queue", "4", "--log-level", "warning",
                        log_path=str(tmp_path / "server.log"))
    words = " ".join(["hello world fox dog"] * 25)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            held = []

            async def one(i: int) -> int:
                body = {"prompt": f"{i} {words}", "max_tokens": 400, "ignore_eos": True, "stream": True}
                cm = c.stream("POST", "/v1/completions", json=body)
                r = await cm.__aenter__()
                held.append(cm)
                return r.status_code

            await asyncio.gather(*(one(i) for i in range(10)))
            await asyncio.sleep(2)
            codes = await asyncio.gather(*(one(100 + i) for i in range(30)))
            waiting = srv.metric("tokenmill:num_requests_waiting")
            for cm in held:
                await cm.__aexit__(None, None, None)
            return [*codes, int(waiting)]

    try:
        *codes, waiting = asyncio.run(burst())
    finally:
        srv.stop()
    # What the free blocks hold, plus 4 queued (a place's estimate counts prompts' blocks, not what
    # running sequences still take): before, the 256 free max_num_seqs places let all 30 in, 18 waiting.
    assert codes.count(429) >= 10 and waiting <= 8, (codes, waiting)


def test_null_means_the_default(http):
    """OpenAI's schema lets these be null (clients generated from it send them): the default, not a 400."""
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None, "stop": None,
             "stream_options": None, "min_tokens": None, "ignore_eos": None, "temperature": 0}
    for path, base, extra in (("/v1/completions", COMPLETION, {"echo": None, "logprobs": None}),
                              ("/v1/chat/completions", CHAT, {"logprobs": None, "top_logprobs": None})):
        plain = http.post(path, json={**base, "temperature": 0})
        r = http.post(path, json={**base, **nulls, **extra})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1 and r.json()["choices"] == plain.json()["choices"]
    _error(http.post("/v1/chat/completions", json={**CHAT, "messages": None}), 400, "messages")


def test_malformed_json_and_wrong_shapes(http):
    for raw in (b'{"prompt": "x",', b"not json", b"", b"\xff\xfe", b"[1, 2]", b'"a string"', b"null",
                b"[" * 30000 + b"]" * 30000, b'{"prompt": "x", "temperature": Infinity}',
                b'{"prompt": "x", "repetition_penalty": 1e999}', b'{"prompt": "x", "top_p": NaN}'):
        for path in ("/v1/completions", "/v1/chat/completions"):
            _error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)


def test_out_of_range_values_that_are_harmless_are_accepted(http):
    # top_k beyond the vocabulary (even beyond int64) means "no top-k", as in vLLM.
    r = http.post("/v1/completions", json={**COMPLETION, "top_k": 2**63, "temperature": 1.0})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={**COMPLETION, "priority": -(2**80), "min_p": 0.0})
    assert r.status_code == 200, r.text


def test_context_window_errors_give_both_numbers(http):
    ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": "Hello world", "max_tokens": 200}),
                 400, "max_tokens")
    assert f"({len(ids)} tokens)" in err["message"] and "(200)" in err["message"] and str(MAX_LEN) in err["message"]
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": list(range(3, 3 + MAX_LEN + 5))}), 400)
    assert str(MAX_LEN + 5) in err["message"] and str(MAX_LEN) in err["message"]
    err = _error(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500}), 400, "max_tokens")
    assert "(500)" in err["message"]
    # Scoring (echo, max_tokens 0) may fill the whole context; generating from it may not.
    full = {**COMPLETION, "prompt": list(range(3, 3 + MAX_LEN)), "echo": True, "logprobs": 0}
    r = http.post("/v1/completions", json={**full, "max_tokens": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {**r.json()["usage"], "prompt_tokens": MAX_LEN, "completion_tokens": 0}
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == MAX_LEN
    _error(http.post("/v1/completions", json={**full, "max_tokens": 1}), 400)
    _error(http.post("/v1/completions", json={**full, "prompt": list(range(3, 4 + MAX_LEN)), "max_tokens": 0}), 400)


def test_unknown_model_and_route_are_404(http):
    err = _error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404, "model")
    assert "gpt-9" in err["message"] and err["code"] == "model_not_found"
    _error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model")
    _error(http.get("/v1/nope"), 404)


def test_openai_client_sees_the_errors(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", temperature=-3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [NAME]


def test_api_key_is_required_on_v1_routes(server):
    _error(httpx.post(server.base_url + "/v1/completions", json=COMPLETION), 401)
    assert httpx.get(server.base_url + "/health").status_code == 200  # probes need no key
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_oversized_bodies_are_413(http):
    big = {**COMPLETION, "prompt": "x" * 70000}
    _error(http.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit applies while the body is read
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}'

    _error(http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


def test_full_queue_is_429_with_retry_after(server, http):
    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as c:
            body = {**COMPLETION, "max_tokens": 100, "ignore_eos": True}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(send_all())
    codes = sorted(r.status_code for r in responses)
    # Two seated (--max-num-seqs 2) and two queued (--max-queue 2) at least, however they arrive.
    assert codes.count(429) >= 1 and codes.count(200) >= 4, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert _error(r, 429)["type"] == "rate_limit_error"
        else:
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


def test_engine_fault_fails_only_that_request(server, http):
    """A step that includes the poisoned request raises; the engine reruns the batch one request
    at a time, so only the culprit fails (500) and its neighbours finish normally."""

    async def run() -> tuple[list[httpx.Response], httpx.Response, list[str]]:
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as c:
            good = {**COMPLETION, "max_tokens": 60, "ignore_eos": True, "temperature": 0}
            poisoned = {**COMPLETION, "seed": 666}

            async def stream_poisoned() -> list[str]:
                async with c.stream("POST", "/v1/completions", json={**poisoned, "stream": True}) as r:
                    return [line async for line in r.aiter_lines() if line.startswith("data:")]

            # The good request is running when the poisoned one joins its batch (max-num-seqs 2).
            good_task = asyncio.create_task(c.post("/v1/completions", json=good))
            await asyncio.sleep(0.2)
            results = await asyncio.gather(good_task, c.post("/v1/completions", json=poisoned), stream_poisoned())
            return [results[0]], results[1], results[2]

    goods, bad, stream_lines = asyncio.run(run())
    for r in goods:
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60
    err = _error(bad, 500)
    assert "injected fault" in err["message"] and err["type"] == "server_error"
    events = [json.loads(x[6:]) for x in stream_lines if x != "data: [DONE]"]
    assert "error" in events[-1] and "injected fault" in events[-1]["error"]["message"]
    assert events[-1]["error"]["code"] == err["code"] == "engine_error"  # (the same failure, streamed or not)
    assert stream_lines[-1] == "data: [DONE]"
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200
    assert server.metric("tokenmill:kv_cache_usage_perc") == 0
    assert "finish_reason=error" in server.log()


# -- fuzzing: generated bodies never cause a 5xx or a hang --------------------------------------
_junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                  st.text(max_size=8), st.lists(st.integers(-3, 600), max_size=4), st.just({}))
_small_int = st.one_of(st.integers(-3, 6), st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1]))
_values = {
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-2, 700), max_size=20),
                        st.lists(st.text(max_size=10), max_size=3), st.lists(st.lists(st.integers(0, 511), max_size=5),
                                                                             max_size=3)),
    "max_tokens": _small_int, "max_completion_tokens": _small_int, "n": _small_int, "logprobs": _small_int,
    "top_logprobs": _small_int, "top_k": _small_int, "min_tokens": _small_int, "priority": _small_int,
    "seed": _small_int,
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "min_p": st.floats(-0.5, 1.5),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(-2, 700), max_size=3),
    "stream": st.booleans(), "ignore_eos": st.booleans(), "echo": st.booleans(), "logprobs_chat": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant", "tool", "bogus"]),
        "content": st.one_of(st.text(max_size=20), st.none(),
                             st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                                      max_size=2)),
    }), max_size=3),
    "model": st.sampled_from([NAME, "other"]),
}


_valid = {
    "prompt": st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(3, 511), min_size=1, max_size=20),
                        st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)),
    "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8), "n": st.integers(1, 3),
    "logprobs": st.integers(0, 5), "top_logprobs": st.integers(0, 5), "top_k": st.integers(-1, 50),
    "min_tokens": st.integers(0, 2), "priority": st.integers(-10, 10), "seed": st.integers(0, 2**64 - 1),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 2),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3), "stop_token_ids": st.lists(st.integers(0, 511)),
    "stream": st.booleans(), "ignore_eos": st.booleans(), "echo": st.booleans(), "logprobs_chat": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": st.text(min_size=1, max_size=20)}),
                         min_size=1, max_size=3),
    "model": st.just(NAME),
}


def _bodies(keys: list[str], base: dict):
    """Mostly a valid request with a few fields changed (valid, out of range, or the wrong type);
    sometimes an arbitrary JSON value."""
    def value(k: str):  # hypothesis favours simple branches of one_of, so pick the branch by a draw
        return st.integers(0, 9).flatmap(lambda r: _valid[k] if r < 7 else _values[k] if r < 9 else _junk)

    field = st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k), value(k)))
    mutated = st.lists(field, max_size=4).map(lambda kv: {**base, **dict(kv)})
    arbitrary = st.one_of(_junk, st.dictionaries(st.text(max_size=6), _junk, max_size=3))
    return st.integers(0, 9).flatmap(lambda r: mutated if r < 8 else arbitrary)


_COMPLETION_KEYS = ["prompt", "max_tokens", "n", "logprobs", "top_k", "min_tokens", "priority", "seed", "temperature",
                    "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
                    "stop_token_ids", "stream", "ignore_eos", "echo", "stream_options", "model"]
_CHAT_KEYS = ["messages", "max_tokens", "max_completion_tokens", "n", "top_logprobs", "top_k", "seed", "temperature",
              "top_p", "stop", "stream", "ignore_eos", "stream_options", "model", "logprobs_chat", "min_tokens"]


_fuzz_statuses: collections.Counter = collections.Counter()


def _post_generated(http, path: str, body) -> None:
    if isinstance(body, dict) and "logprobs_chat" in body:
        body["logprobs"] = body.pop("logprobs_chat")
    start = time.time()
    r = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30)
    _fuzz_statuses[(path, r.status_code)] += 1
    assert r.status_code < 500, (body, r.text)
    assert time.time() - start < 30
    if r.status_code != 200:
        _error(r, r.status_code)
    elif '"stream": true' in json.dumps(body):
        assert r.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies(_COMPLETION_KEYS, COMPLETION))
def test_fuzz_completions(http, body):
    _post_generated(http, "/v1/completions", body)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies(_CHAT_KEYS, CHAT))
def test_fuzz_chat_completions(http, body):
    _post_generated(http, "/v1/chat/completions", body)


def test_server_is_healthy_and_idle_after_fuzzing(server, http):
    # The generated bodies reached the engine as well as the validators.
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert _fuzz_statuses[(path, 200)] >= 5 and _fuzz_statuses[(path, 400)] >= 5, _fuzz_statuses
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200
    deadline = time.time() + 10
    while server.metric("tokenmill:kv_cache_usage_perc") != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("tokenmill:kv_cache_usage_perc") == 0
    assert server.metric("tokenmill:num_requests_running") == 0


def test_serve_with_a_bad_model_folder_exits_with_a_clear_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error:" in r.stderr and "missing" in r.stderr


# -- shutdown ----------------------------------------------------------------------------------
def test_sigterm_lets_in_flight_requests_finish_and_exits_0(model_dir, tmp_path):
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.02", log_path=str(tmp_path / "server.log"))
    name = model_dir.rstrip("/").split("/")[-1]
    try:
        async def run() -> list[tuple[int, str]]:
            started = [asyncio.Event() for _ in range(4)]

            async def one(i: int) -> tuple[int, str]:
                body = {"model": name, "prompt": "Hello", "max_tokens": 300, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                usage, last = 0, ""
                async with httpx.AsyncClient(timeout=60) as c:
                    async with c.stream("POST", srv.base_url + "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            started[i].set()
                            last = line
                            if line != "data: [DONE]":
                                usage = json.loads(line[6:]).get("usage") or usage
                return (usage or {}).get("completion_tokens", 0), last

            async def terminate() -> None:
                for e in started:
                    await e.wait()
                srv.signal(signal.SIGTERM)

            results = await asyncio.gather(*(one(i) for i in range(4)), terminate())
            return results[:4]

        results = asyncio.run(run())
        assert results == [(300, "data: [DONE]")] * 4
        assert srv.proc.wait(30) == 0
        assert "received SIGTERM: draining in-flight requests" in srv.log()
    finally:
        srv.stop()


def test_sigint_on_an_idle_server_exits_0(model_dir, tmp_path):
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.01", log_path=str(tmp_path / "server.log"))
    try:
        srv.signal(signal.SIGINT)
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
