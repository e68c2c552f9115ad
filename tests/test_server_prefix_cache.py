"""Prefix caching through HTTP: cached_tokens in usage, Prometheus counters, cache salts."""

from __future__ import annotations

import httpx
import pytest

from tests.server_utils import ServerProcess


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("pc-server") / "server.log")
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.0625", "--block-size", "16", log_path=log)
    yield srv
    assert srv.stop() == 0


def _counters(server: ServerProcess) -> tuple[float, float]:
    return server.metric("tokenmill:prefix_cache_queries_total"), server.metric("tokenmill:prefix_cache_hits_total")


def test_three_requests_sharing_a_40_token_prefix(server, client, model_name):
    prefix = list(range(300, 340))
    q0, h0 = _counters(server)
    cached = []
    for i in range(3):
        r = client.completions.create(model=model_name, prompt=prefix + [400 + i] * 5, max_tokens=2, temperature=0)
        assert r.usage.prompt_tokens == 45
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached == [0, 32, 32]
    q1, h1 = _counters(server)
    assert (q1 - q0, h1 - h0) == (3 * 45, 64)
    assert server.metric("tokenmill:kv_cache_cached_blocks") > 0
    assert server.metric("tokenmill:kv_cache_usage_perc") == 0

    # The streamed usage chunk reports it too.
    stream = client.completions.create(model=model_name, prompt=prefix + [499] * 5, max_tokens=3, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == 32

    # Several prompts in one request: cached tokens add up over the prompts.
    r = client.completions.create(model=model_name, prompt=[prefix + [401] * 5, prefix + [402] * 5], max_tokens=1)
    assert r.usage.prompt_tokens_details.cached_tokens == 64


def test_chat_reports_cached_tokens(client, model_name):
    messages = [{"role": "system", "content": "You are a careful assistant. " * 8},
                {"role": "user", "content": "Hello world! How are you"}]
    first = client.chat.completions.create(model=model_name, messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model=model_name, messages=messages, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert again.usage.prompt_tokens == n
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    stream = client.chat.completions.create(model=model_name, messages=messages, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16


def test_salts_isolate_the_cache(client, model_name):
    prompt = list(range(200, 236))  # 2 full blocks + 4 tokens

    def cached(salt: str | None) -> int:
        body = {"cache_salt": salt} if salt is not None else {}
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, extra_body=body)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("alice") == 0
    assert cached("bob") == 0  # same tokens, another salt: nothing shared
    assert cached(None) == 0
    assert cached("alice") == 32
    assert cached("bob") == 32
    assert cached(None) == 32


def test_empty_or_wrong_cache_salt_is_a_400(server, model_name):
    for salt in ("", 5):
        r = httpx.post(server.base_url + "/v1/completions", timeout=30,
                       json={"model": model_name, "prompt": "Hello", "max_tokens": 1, "cache_salt": salt})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "cache_salt"


def test_stop_token_text_is_dropped(client, model_name, llm):
    from tokenmill import SamplingParams

    prompt = "The quick brown fox"
    ids = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    stop_id = ids[4]
    first = ids.index(stop_id)
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [stop_id],
                                              "skip_special_tokens": False})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert r.usage.completion_tokens == first + 1  # the stop token counts as generated
    assert c.text == llm.get_tokenizer().decode(ids[:first], skip_special_tokens=False)


def test_return_tokens_as_token_ids(client, model_name, llm):
    from tokenmill import SamplingParams

    prompt = "Hello world! How"
    want = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in want]
    assert all(k.startswith("token_id:") for top in r.choices[0].logprobs.top_logprobs for k in top)
    stream = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=0, stream=True, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    tokens = [t.token for c in stream for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert len(tokens) == 4 and all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens)
    # The bytes stay each token's own, in top_logprobs as beside the token (not those of "token_id:N").
    kw = dict(model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0,
              logprobs=True, top_logprobs=3)
    plain = client.chat.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].logprobs.content
    as_ids = client.chat.completions.create(
        **kw, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}).choices[0].logprobs.content
    assert [t.bytes for t in as_ids] == [t.bytes for t in plain]
    assert [[x.bytes for x in t.top_logprobs] for t in as_ids] == [[x.bytes for x in t.top_logprobs] for t in plain]
    assert as_ids[0].top_logprobs[0].token.startswith("token_id:") and not plain[0].token.startswith("token_id:")
