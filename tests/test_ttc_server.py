"""test_time_compute through a real `tokenmill serve` with the official openai client: one
answer and its account, streamed and not, on chat and completions; 400s naming the field; a
client that goes away aborts every path and frees every block."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server_utils import ServerProcess

TTC = {"n": 6, "answer_pattern": r"\S+"}
# Each path ends at its first space, so its answer is one word and paths vote.
KW = dict(max_tokens=16, temperature=1.0, seed=5, stop=[" "])


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = ServerProcess(model_dir, "--kv-cache-memory", "0.0625",
                      log_path=str(tmp_path_factory.mktemp("ttc_log") / "server.log"))
    yield s
    s.stop()


def _idle(server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = {k.split("{")[0]: v for k, v in server.metrics().items()}
        if (m["tokenmill:num_requests_running"] == 0 and m["tokenmill:num_requests_waiting"] == 0
                and m["tokenmill:kv_cache_usage_perc"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.05)


def test_chat_one_answer_with_its_account_streamed_the_same(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Say a word"}],
                                       extra_body={"test_time_compute": TTC}, **KW)
    acct = r.model_extra["test_time_compute"]
    assert len(r.choices) == 1 and r.choices[0].message.content
    assert acct["strategy"] == "self_consistency" and acct["paths_started"] == 6
    assert r.usage.completion_tokens == acct["tokens"]["generated"] >= 6
    assert r.usage.prompt_tokens == acct["tokens"]["prompt"]
    if acct["answer"] is not None:
        assert r.choices[0].message.content.strip().split()[-1] == acct["answer"]
        assert acct["votes"][acct["answer"]] == max(acct["votes"].values())
    # Streamed: the role at once, then the winner (the same paths: seeded per path), then usage.
    chunks = list(client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Say a word"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"test_time_compute": TTC}, **KW))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.model_extra.get("test_time_compute") for c in chunks if c.choices][-1]["votes"] == acct["votes"]


def test_completions_and_best_of_n(client, model_name):
    r = client.completions.create(model=model_name, prompt="Once upon a time",
                                  extra_body={"test_time_compute": {"n": 4, "strategy": "best_of_n"}}, **KW)
    acct = r.model_extra["test_time_compute"]
    assert len(r.choices) == 1 and acct["strategy"] == "best_of_n" and len(acct["scores"]) == acct["paths_finished"]
    best = max(acct["scores"].values())
    assert acct["scores"][str(acct["winner_path"])] == best


def test_early_stop_and_budget_over_http(client, model_name):
    r = client.completions.create(
        model=model_name, prompt="One two three", max_tokens=40, temperature=1.0, seed=2,
        extra_body={"test_time_compute": {"n": 8, "early_stop": True, "max_total_tokens": 90, "window": 4}})
    acct = r.model_extra["test_time_compute"]
    assert acct["tokens"]["total"] <= 90 and r.usage.completion_tokens == acct["tokens"]["generated"]


@pytest.mark.parametrize("extra,param", [
    ({"test_time_compute": {"strategy": "majority"}}, "test_time_compute.strategy"),
    ({"test_time_compute": {"n": 65}}, "test_time_compute.n"),
    ({"test_time_compute": {"answer_pattern": "(unclosed"}}, "test_time_compute.answer_pattern"),
    ({"test_time_compute": {"max_total_tokens": 2}}, "test_time_compute.max_total_tokens"),
    ({"test_time_compute": {"beams": 2}}, "test_time_compute.beams"),
    ({"test_time_compute": {"n": 4}, "n": 2}, "n"),
    ({"test_time_compute": {"n": 4}, "logprobs": 1}, "logprobs"),
    ({"test_time_compute": {"n": 4}, "logprobs": 0}, "logprobs"),
    ({"test_time_compute": {"max_total_tokens": 2}, "stream": True}, "test_time_compute.max_total_tokens"),
    ({"test_time_compute": {"n": 4}, "prompt": ["a", "b"]}, "prompt"),
    ({"test_time_compute": {"consensus": 0.9}}, "test_time_compute.consensus"),
    ({"test_time_compute": {"strategy": "beam_search", "n": 4}, "presence_penalty": 1.0}, "presence_penalty"),
    ({"test_time_compute": {"strategy": "beam_search", "length_penalty": 99}}, "test_time_compute.length_penalty"),
])
def test_bad_input_is_a_400_naming_the_field(server, model_name, extra, param):
    body = {"model": model_name, "prompt": "Hello there", "max_tokens": 4, **extra}
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "Hi"}], "test_time_compute": {"n": 2}, "stop": [" "]},  # no max_tokens
    {"messages": [{"role": "user", "content": "Hi"}], "stop": [" "], "seed": 2**64 - 1,
     "test_time_compute": {"n": 4, "early_stop": True, "wave": 2}},
    {"messages": [{"role": "user", "content": "Hi"}], "stop": [" "], "max_tokens": None,
     "test_time_compute": {"n": 2, "max_total_tokens": 100_000}},
    {"messages": [{"role": "user", "content": "Hi"}], "stop": [" "], "max_tokens": 6,
     "test_time_compute": {"n": 3, "answer_pattern": "(qqqzzz)|[\\s\\S]"}},
    {"messages": [{"role": "user", "content": "Hi"}], "stop": [" "], "max_tokens": 6,
     "test_time_compute": {"n": 8, "early_stop": True, "consensus": 1}},
    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
     "test_time_compute": {"strategy": "beam_search", "n": 3, "length_penalty": 0}},
])
def test_odd_but_valid_requests_succeed(server, model_name, body):
    for stream in (False, True):
        r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": model_name, **body, "stream": stream},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert "error" not in r.text and (not stream or r.text.rstrip().endswith("data: [DONE]"))


@pytest.mark.parametrize("when", ["running", "at-once"])
def test_a_client_that_goes_away_aborts_every_path(server, model_name, when):
    """Every path is aborted and the request counts once, as an abort (also when it leaves before
    the driver has read any output: its launches run uncounted, the driver counts the request)."""
    body = {"model": model_name, "prompt": "Tell me a very long story " * (1 if when == "running" else 20),
            "max_tokens": 400, "ignore_eos": True, "stream": True, "test_time_compute": {"n": 8}}

    def aborts() -> float:
        return sum(v for k, v in server.metrics().items()
                   if k.startswith("tokenmill:request_success_total") and 'finished_reason="abort"' in k)

    async def leave_early() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                if when == "running":
                    deadline = time.time() + 10
                    while server.metric("tokenmill:num_requests_running") == 0 and time.time() < deadline:
                        await asyncio.sleep(0.01)
                    assert server.metric("tokenmill:kv_cache_usage_perc") > 0
        # Leaving the block closed the connection while the paths were running.

    _idle(server)
    before = aborts()
    asyncio.run(leave_early())
    m = _idle(server)
    assert m["tokenmill:num_requests_running"] == 0 and m["tokenmill:kv_cache_usage_perc"] == 0
    time.sleep(0.3)  # (counted when the server notices the client gone)
    assert aborts() - before == 1


def test_n_beside_test_time_compute_is_a_400_for_the_openai_client(client, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], n=2,
                                       extra_body={"test_time_compute": {"n": 3}})
    assert "test_time_compute" in e.value.message
