"""The OpenAI-compatible server, as a real process on 127.0.0.1, through the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from tests.server_utils import ServerProcess


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.0625", "--max-num-batched-tokens", "256",
                        "--log-level", "info", log_path=log)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def offline(model_dir):
    from tokenmill import LLM

    return LLM(model_dir, kv_cache_memory_bytes=16 * 2**20, seed=0)


PROMPTS = ["Hello world! How are you", "The quick brown fox", "def fib(n):", "Café crème", "Stop here. STOP."]


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


# -- basic endpoints ---------------------------------------------------------------------------
def test_health_models_and_tokenize(server, client, model_name):
    assert httpx.get(server.base_url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    tok = httpx.post(server.base_url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    detok = httpx.post(server.base_url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == "Hello world"
    chat = httpx.post(server.base_url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > tok["count"] - 2  # the template adds role markers


def test_models_retrieve(client, model_name):
    m = client.models.retrieve(model_name)
    assert m.id == model_name and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found" and "no-such-model" in e.value.body["message"]


def test_openapi_documents_request_bodies(server):
    """Every POST route declares its JSON body with the request model's fields, so /docs and
    schema-driven clients see the parameters."""
    schema = httpx.get(server.base_url + "/openapi.json").json()
    comps = schema["components"]["schemas"]
    expected = {"/v1/completions": ("prompt", "max_tokens", "logprobs"),
                "/v1/chat/completions": ("messages", "max_tokens", "response_format"),
                "/tokenize": ("prompt", "messages"), "/detokenize": ("tokens",)}
    for path, fields in expected.items():
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        props = comps[ref.rsplit("/", 1)[1]]["properties"]
        assert set(fields) <= set(props), path
    assert "/v1/models/{model_id}" in schema["paths"]
    for ref in json.dumps(schema).split('"$ref": "')[1:]:  # every reference resolves
        assert ref.split('"')[0].rsplit("/", 1)[1] in comps


def test_completion_matches_offline_engine(client, model_name, offline):
    from tokenmill import SamplingParams

    for prompt in PROMPTS:
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0)
        want = offline.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
        assert r.choices[0].text == want.outputs[0].text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_equals_non_streamed_and_usage_is_exact(server, client, model_name):
    for prompt in PROMPTS:
        kw = dict(model=model_name, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        full = client.completions.create(**kw)
        texts, reasons, usage = _stream_text(
            client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert texts[0] == full.choices[0].text
        assert reasons[0] == full.choices[0].finish_reason == "length"
        assert usage.completion_tokens == full.usage.completion_tokens == 40
        n_prompt = httpx.post(server.base_url + "/tokenize", json={"prompt": prompt}).json()["count"]
        assert usage.prompt_tokens == full.usage.prompt_tokens == n_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    kw = dict(model=model_name, messages=messages, max_completion_tokens=30, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant"
    texts, reasons, usage = _stream_text(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert texts[0] == full.choices[0].message.content
    assert reasons[0] == full.choices[0].finish_reason == "length"
    n_prompt = httpx.post(server.base_url + "/tokenize", json={"messages": messages}).json()["count"]
    assert usage.prompt_tokens == full.usage.prompt_tokens == n_prompt
    assert usage.completion_tokens == full.usage.completion_tokens == 30


def test_chat_applies_the_template(client, model_name, offline):
    from tokenmill import SamplingParams

    messages = [{"role": "user", "content": "The quick brown fox"}]
    r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    rendered = offline.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<s>assistant\n")
    ids = offline.get_tokenizer().encode(rendered, add_special_tokens=False)
    want = offline.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=16, temperature=0))[0]
    assert r.choices[0].message.content == want.outputs[0].text


def test_chat_continue_final_message_and_template_kwargs(client, server, model_name, offline):
    """vLLM's continue_final_message (the assistant's last message left open) and
    chat_template_kwargs, on the chat endpoint and /tokenize; the offline LLM.chat renders the same."""
    from tokenmill import SamplingParams

    going = [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps over"}]
    r = client.chat.completions.create(model=model_name, messages=going, max_tokens=12, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True,
                                                   "chat_template_kwargs": {"enable_thinking": False}})
    want = offline.chat(going, SamplingParams(max_tokens=12, temperature=0), add_generation_prompt=False,
                        continue_final_message=True)[0]
    assert r.choices[0].message.content == want.outputs[0].text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and want.prompt.endswith("jumps over")
    n = httpx.post(server.base_url + "/tokenize", json={"messages": going, "add_generation_prompt": False,
                                                         "continue_final_message": True}).json()["count"]
    assert n == len(want.prompt_token_ids)
    for extra, param in [({"continue_final_message": True}, "continue_final_message"),
                         ({"chat_template_kwargs": {"add_generation_prompt": True}}, "chat_template_kwargs")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model_name, messages=going, max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param
        r = httpx.post(server.base_url + "/tokenize", json={"messages": going, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_n_and_seed(client, model_name):
    kw = dict(model=model_name, prompt="Hello", max_tokens=20, temperature=1.0, n=2, seed=1234, logprobs=0)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # sample i is seeded seed + i
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    texts, _, _ = _stream_text(client.completions.create(stream=True, **kw))
    assert [texts[0], texts[1]] == [c.text for c in a.choices]
    # Several prompts: choice index = prompt index * n + sample index.
    multi = client.completions.create(**{**kw, "prompt": ["Hello", "The quick"]})
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert [c.text for c in multi.choices[:2]] == [c.text for c in a.choices]
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=10, n=3, seed=5)
    assert len(chat.choices) == 3


def test_stop_strings(client, model_name):
    base = client.completions.create(model=model_name, prompt="The quick brown fox", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # A stop string taken from the middle of the greedy text cuts it exactly there.
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    assert stop.strip()
    cut = base[: base.index(stop)]
    kw = dict(model=model_name, prompt="The quick brown fox", max_tokens=40, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"
    texts, reasons, _ = _stream_text(client.completions.create(stream=True, **kw))
    assert texts[0] == cut and reasons[0] == "stop"
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=30, temperature=0, stop="e")
    assert "e" not in chat.choices[0].message.content


def test_logprobs(client, model_name, offline):
    from tokenmill import SamplingParams

    r = client.completions.create(model=model_name, prompt="Hello world", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    want = offline.generate("Hello world", SamplingParams(max_tokens=8, temperature=0, logprobs=3))[0].outputs[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for i, (tid, entry) in enumerate(zip(want.token_ids, want.logprobs)):
        assert lp.token_logprobs[i] == pytest.approx(entry[tid].logprob, abs=1e-4)
        assert len(lp.top_logprobs[i]) <= 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)  # greedy = top 1

    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    # Streamed logprobs carry the same numbers.
    streamed = []
    for chunk in client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                                stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed.extend(x.logprob for x in c.logprobs.content)
    assert streamed == pytest.approx([x.logprob for x in content], abs=1e-6)


def test_vllm_extra_sampling_fields(client, model_name):
    kw = dict(model=model_name, prompt="Hello", max_tokens=12, seed=3)
    r = client.completions.create(**kw, extra_body={"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0,
                                                    "min_tokens": 12, "priority": -1})
    greedy = client.completions.create(model=model_name, prompt="Hello", max_tokens=12, temperature=0,
                                       extra_body={"min_tokens": 12})
    assert r.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy
    assert r.usage.completion_tokens == 12
    pen = client.completions.create(model=model_name, prompt="Hello", max_tokens=12, temperature=0,
                                    presence_penalty=2.0, frequency_penalty=2.0, user="u1",
                                    extra_body={"ignore_eos": True})
    assert pen.usage.completion_tokens == 12


def test_echo_and_long_prompts(client, model_name):
    r = client.completions.create(model=model_name, prompt="Hello world", max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model=model_name, prompt="Hello world", max_tokens=5, temperature=0)
    assert r.choices[0].text == "Hello world" + plain.choices[0].text
    texts, _, _ = _stream_text(client.completions.create(model=model_name, prompt="Hello world", max_tokens=5,
                                                         temperature=0, echo=True, stream=True))
    assert texts[0] == r.choices[0].text
    # A prompt long enough to be tokenized off the event loop.
    long = "The quick brown fox jumps over the lazy dog. " * 110
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt=long * 3, max_tokens=5)
    assert "max_model_len" in e.value.body["message"]
    assert client.completions.create(model=model_name, prompt=long[:4500], max_tokens=3).usage.completion_tokens == 3


# -- concurrency -------------------------------------------------------------------------------
def test_32_concurrent_streams_match_solo_runs(server, client, model_name):
    reqs = [dict(prompt=PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), max_tokens=8 + (i * 7) % 40)
            for i in range(32)]
    solo = [client.completions.create(model=model_name, temperature=0, extra_body={"ignore_eos": True}, **r)
            .choices[0].text for r in reqs]

    async def run_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(r) -> str:
            text = ""
            stream = await aclient.completions.create(model=model_name, temperature=0, stream=True,
                                                      extra_body={"ignore_eos": True}, **r)
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.text
            return text

        try:
            return await asyncio.gather(*(one(r) for r in reqs))
        finally:
            await aclient.close()

    assert asyncio.run(run_all()) == solo
    assert server.metric("tokenmill:num_requests_running") == 0


# -- cancellation ------------------------------------------------------------------------------
def _wait_idle(server, timeout: float = 10.0) -> dict[str, float]:
    import time

    deadline = time.time() + timeout
    while True:
        m = {k.split("{")[0]: v for k, v in server.metrics().items()}
        idle = (m["tokenmill:num_requests_running"] == 0 and m["tokenmill:num_requests_waiting"] == 0
                and m["tokenmill:kv_cache_usage_perc"] == 0)
        if idle or time.time() > deadline:
            return m
        time.sleep(0.05)


def test_dropped_streams_are_aborted_and_free_their_blocks(server, model_name):
    aborted_before = server.metrics().get(
        f'tokenmill:request_success_total{{finished_reason="abort",model_name="{model_name}",tenant="default"}}', 0)

    async def drop_after_a_few_tokens(i: int) -> int:
        body = {"model": model_name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 900, "stream": True,
                "ignore_eos": True}
        got = 0
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        got += 1
                        if got == 3:
                            break  # leaving the block closes the connection mid-stream
        return got

    async def main() -> list[int]:
        return await asyncio.gather(*(drop_after_a_few_tokens(i) for i in range(8)))

    assert asyncio.run(main()) == [3] * 8
    m = _wait_idle(server)
    assert m["tokenmill:num_requests_running"] == 0
    assert m["tokenmill:num_requests_waiting"] == 0
    assert m["tokenmill:kv_cache_usage_perc"] == 0
    aborted = server.metrics()[
        f'tokenmill:request_success_total{{finished_reason="abort",model_name="{model_name}",tenant="default"}}']
    assert aborted - aborted_before == 8


def test_disconnect_while_waiting_for_a_non_streamed_answer(server, model_name):
    import socket
    import time

    body = json.dumps({"model": model_name, "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.time() + 10
    while server.metric("tokenmill:num_requests_running") == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert server.metric("tokenmill:kv_cache_usage_perc") > 0
    s.close()
    m = _wait_idle(server)
    assert m["tokenmill:num_requests_running"] == 0 and m["tokenmill:kv_cache_usage_perc"] == 0


# -- metrics and logs --------------------------------------------------------------------------
def test_metrics_count_requests_and_tokens(server, client, model_name):
    before = server.metrics()
    r = client.completions.create(model=model_name, prompt="Hello world", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = server.metrics()
    label = f'{{model_name="{model_name}"}}'
    request_label = f'{{model_name="{model_name}",tenant="default"}}'  # no --tenants: the default tenant

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta(f"tokenmill:prompt_tokens_total{request_label}") == r.usage.prompt_tokens
    assert delta(f"tokenmill:generation_tokens_total{request_label}") == 10
    assert delta(f'tokenmill:request_success_total{{finished_reason="length",model_name="{model_name}",'
                 f'tenant="default"}}') == 1
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):
        assert delta(f"tokenmill:{h}_count{request_label}") == 1
    assert after[f"tokenmill:num_preemptions_total{label}"] >= 0
    assert after[f"tokenmill:kv_cache_usage_perc{label}"] == 0
    log = server.log()
    assert f"request {r.id}-0: tenant=default prompt_tokens={r.usage.prompt_tokens} output_tokens=10 " in log
    assert "finish_reason=length" in log


def _sample(metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_metrics_count_an_embeddings_prompt_and_hold_its_slo_to_its_latency():
    """An embedding makes no token: its prompt still counts (when its vector is out), and a TTFT
    target is held against its end-to-end latency rather than counted a miss for want of a TTFT."""
    from tokenmill.engine.slo import SLOTarget
    from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from tokenmill.server.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: [])
    for rid, (e2e, target) in enumerate([(0.2, 1.0), (2.0, 1.0)]):
        m = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.01)
        running = RequestOutput(str(rid), None, [1, 2, 3, 4, 5], None, [CompletionOutput(0, "", [], None, None)],
                                False, m, prompt_only=True, slo=SLOTarget(ttft_s=target, slo_class="interactive"))
        metrics.observe(running, "emb")
        m.finished_time = 100.0 + e2e
        running.outputs[0].finish_reason = "stop"
        done = RequestOutput(str(rid), None, [1, 2, 3, 4, 5], None, running.outputs, True, m, prompt_only=True,
                             embedding=[0.6, 0.8], slo=running.slo)
        metrics.observe(done, "emb")
    labels = {"model_name": "emb", "tenant": "default"}
    assert _sample(metrics, "tokenmill:prompt_tokens_total", **labels) == 10
    assert _sample(metrics, "tokenmill:generation_tokens_total", **labels) == 0
    slo = {**labels, "slo_class": "interactive"}
    assert _sample(metrics, "tokenmill:slo_attained_total", **slo) == 1
    assert _sample(metrics, "tokenmill:slo_missed_total", **slo, reason="ttft") == 1


def test_metrics_count_only_the_tokens_a_resumed_stream_generated_here():
    """resume_token_ids: the handed-over tokens are outputs (usage) but another replica made them."""
    from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from tokenmill.server.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: [])
    m = RequestMetrics(arrival_time=0.0, first_token_time=1.0, finished_time=10.0, num_generated_tokens=10,
                       num_resumed_tokens=100)
    out = RequestOutput("r", None, [1, 2], None, [CompletionOutput(0, "", list(range(110)), None, None, "length")],
                        True, m)
    metrics.observe(out, "m")
    assert _sample(metrics, "tokenmill:generation_tokens_total", model_name="m", tenant="default") == 10
    assert m.mean_tpot == 1.0  # 9 s over the 9 tokens after this replica's first


def test_goodput_forgets_old_requests_without_a_scrape(monkeypatch):
    """Goodput keeps the requests of its window only, scraped or not."""
    from tokenmill.server import metrics as metrics_mod

    now = [1000.0]
    monkeypatch.setattr(metrics_mod.time, "monotonic", lambda: now[0])
    g = metrics_mod.Goodput()
    for _ in range(10_000):
        g.add("m", "interactive")
        now[0] += 0.1
    assert len(g._met["m", "interactive"]) <= g.WINDOW_S / 0.1 + 1
    assert g.rate("m", "interactive") == pytest.approx(10.0, rel=0.02)


# -- scoring: echo + logprobs, max_tokens 0, prompt_logprobs ---------------------------------------
def _hf_prompt_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """transformers' log-probability of each prompt token given the ones before it ([len - 1])."""
    from tests.models import hf_model

    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_logprobs_score_the_prompt(client, model_name, model_dir):
    """lm-evaluation-harness's request: token-id prompts, echo, logprobs=1, max_tokens 0 or 1. Every
    prompt position is scored (the first null), equal to transformers' within 1e-4, and the same
    request again scores every position the same."""
    ids = [[5, 17, 99, 3, 250, 41, 7], [300, 12, 12, 12, 80]]
    first = client.completions.create(model=model_name, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
    again = client.completions.create(model=model_name, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
    assert first.usage.completion_tokens == 0 and first.usage.prompt_tokens == 12
    for prompt, a, b in zip(ids, first.choices, again.choices):
        lp = a.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = _hf_prompt_logprobs(model_dir, prompt)
        for got, want in zip(lp.token_logprobs[1:], ref.tolist()):
            assert got == pytest.approx(want, abs=1e-4)
        for top, tok, got in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:]):
            assert top[tok] == got and len(top) in (1, 2)  # the top token, and the prompt's own if other
        assert a.finish_reason == "length" and a.text == b.text != ""  # the prompt, decoded
        assert b.logprobs.token_logprobs == lp.token_logprobs
    one = client.completions.create(model=model_name, prompt=ids[0], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    lp = one.choices[0].logprobs
    assert len(lp.tokens) == len(ids[0]) + 1 and one.usage.completion_tokens == 1
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids[0])] == pytest.approx(first.choices[0].logprobs.token_logprobs[1:], abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_logprobs_streamed_and_text_prompts(client, model_name):
    kw = dict(model=model_name, prompt="Hello world, scored", echo=True, logprobs=2, temperature=0)
    whole = client.completions.create(max_tokens=3, **kw)
    chunks = list(client.completions.create(max_tokens=3, stream=True, **kw))
    tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    lps = [x for ch in chunks for c in ch.choices if c.logprobs for x in c.logprobs.token_logprobs]
    offsets = [o for ch in chunks for c in ch.choices if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == whole.choices[0].logprobs.tokens and lps == whole.choices[0].logprobs.token_logprobs
    # Offsets run on past the echoed prompt in every chunk (the prompt's part is exact; the
    # completion's follow the streamed text, the whole answer's the token strings).
    n_prompt = whole.usage.prompt_tokens
    assert offsets[:n_prompt] == whole.choices[0].logprobs.text_offset[:n_prompt]
    assert offsets == sorted(offsets) and offsets[n_prompt] >= offsets[n_prompt - 1]
    assert len({ch.choices[0].logprobs is not None for ch in chunks if ch.choices}) == 1  # every chunk has some
    assert "".join(c.text for ch in chunks for c in ch.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith("Hello world, scored")
    scored = list(client.completions.create(max_tokens=0, stream=True, **kw))
    assert [c.text for ch in scored for c in ch.choices] == ["Hello world, scored"]


def test_text_offsets_are_where_each_tokens_text_starts(client, model_name, model_dir):
    """text_offset[i]: the length of the text before token i (a token holding part of a character
    starts where that character does), for the echoed prompt and the completion, streamed or not,
    whatever the token strings (vocabulary pieces, token_id:N)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = "😀 héllo wörld, ünïcode ✓"
    for as_ids in (False, True):
        kw = dict(model=model_name, prompt=prompt, echo=True, logprobs=1, temperature=0, max_tokens=24,
                  extra_body={"return_token_ids": True, "return_tokens_as_token_ids": as_ids, "ignore_eos": True})
        whole = client.completions.create(**kw).choices[0]
        ids = whole.model_extra["prompt_token_ids"] + whole.model_extra["token_ids"]
        assert whole.text.startswith(prompt)
        want = [min(len(tok.decode(ids[:i], skip_special_tokens=True).rstrip("\ufffd")), len(whole.text))
                for i in range(len(ids))]
        assert whole.logprobs.text_offset == want
        assert any(ord(c) > 0xFFFF or c in "éöüï✓" for c in prompt)  # (multi-byte characters: split tokens)
        chunks = list(client.completions.create(stream=True, **kw))
        streamed = [o for ch in chunks for c in ch.choices if c.logprobs for o in c.logprobs.text_offset]
        assert streamed == want
    # Special tokens written in the prompt are in the echoed text: each token is at its offset.
    r = client.completions.create(model=model_name, prompt="<s>user\nhello world</s> again", echo=True, logprobs=0,
                                  max_tokens=1, temperature=0).choices[0]
    n = len(r.logprobs.tokens) - 1
    assert [r.text.startswith(t, o) for t, o in zip(r.logprobs.tokens[:n], r.logprobs.text_offset)] == [True] * n
    assert r.logprobs.tokens[0] == "<s>" and r.logprobs.text_offset[:2] == [0, 3]


def test_prompt_logprobs_field(client, model_name, model_dir):
    """vLLM's prompt_logprobs: per prompt position None or {token id: {logprob, rank, decoded_token}},
    on completions (in each choice) and chat (beside the choices); not with stream."""
    ids = [5, 17, 99, 3, 250]
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    ref = _hf_prompt_logprobs(model_dir, ids).tolist()
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert entry[str(ids[pos])]["logprob"] == pytest.approx(ref[pos - 1], abs=1e-4)
        assert 3 <= len(entry) <= 4 and {e["rank"] for e in entry.values()} >= {1, 2, 3}
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2, extra_body={"prompt_logprobs": 0})
    cplp = chat.model_extra["prompt_logprobs"]
    assert cplp[0] is None and all(len(e) in (1, 2) for e in cplp[1:]) and len(cplp) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=model_name, prompt="x", stream=True, extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], stream=True,
                                       extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0 is only allowed with echo"):
        client.completions.create(model=model_name, prompt="x", max_tokens=0)


def test_requests_that_leave_sampling_out_get_the_models_generation_config(tmp_path):
    """vLLM's --generation-config auto: a request without temperature/top_k/max_tokens samples with
    the model's generation_config.json settings; what a request gives wins."""
    from tests.models import CHAT_TEMPLATE, make_model

    template = CHAT_TEMPLATE + "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    path = make_model(str(tmp_path / "m"), "llama", chat_template=template)
    with open(f"{path}/generation_config.json") as f:
        gen = json.load(f)
    gen.update(top_k=1, max_new_tokens=6, repetition_penalty=1.2)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump(gen, f)
    srv = ServerProcess(path, "--kv-cache-memory", "0.02", "--max-model-len", "64", log_path=str(tmp_path / "log"))
    try:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        msgs = [{"role": "user", "content": "Hello there"}]
        kw = dict(model="m", messages=msgs, extra_body={"ignore_eos": True})
        a, b = (c.chat.completions.create(**kw, temperature=1.5) for _ in range(2))  # top_k 1: greedy
        assert a.choices[0].message.content == b.choices[0].message.content and a.usage.completion_tokens == 6
        greedy = c.chat.completions.create(**kw, temperature=0, max_tokens=6)
        assert greedy.choices[0].message.content == a.choices[0].message.content
        assert c.chat.completions.create(**kw, max_tokens=9).usage.completion_tokens == 9
        assert "default sampling settings from generation_config.json" in srv.log()
        # The default max_tokens is an upper bound: a prompt that leaves 4 tokens of room gets them.
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": list(range(5, 65)), "max_tokens": None,
                                                                "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        # The default penalty stays out of beam search (which refuses penalties it is given).
        beams = c.chat.completions.create(**{**kw, "extra_body": {"use_beam_search": True}}, n=2, max_tokens=4)
        assert len(beams.choices) == 2
        # chat_template_kwargs reach the template.
        n = [httpx.post(srv.base_url + "/tokenize", json={"messages": msgs, **extra}).json()["count"]
             for extra in ({}, {"chat_template_kwargs": {"enable_thinking": False}})]
        assert n[1] > n[0]
    finally:
        srv.stop()


def test_vllm_service_routes_tokenize_tools_and_ignored_fields(server, model_name):
    """vLLM's /ping and /version; /tokenize refuses a malformed tool; a field the API does not know
    is ignored and logged once, as vLLM does."""
    base = server.base_url
    assert httpx.get(base + "/ping").status_code == 200 and httpx.post(base + "/ping").status_code == 200
    from tokenmill import __version__

    assert httpx.get(base + "/version").json() == {"version": __version__}
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(base + "/tokenize", json={"messages": msgs, "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0]"
    r = httpx.post(base + "/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 2,
                                                   "store": True, "zz_unknown_field": 1})
    assert r.status_code == 200
    assert "present in the request but ignored: ['store', 'zz_unknown_field']" in server.log()
    many = {f"k{i:04d}": 1 for i in range(3000)}  # (what is kept and logged is bounded)
    r = httpx.post(base + "/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 1, **many})
    assert r.status_code == 200 and "(and 2984 more)" in server.log()


def test_truncate_prompt_tokens(client, server, model_name, offline):
    """vLLM's truncate_prompt_tokens keeps a prompt's last k tokens (usage counts them), on
    completions, chat and offline; -1 is max_model_len; bad values and echo are 400s."""
    from tokenmill import SamplingParams

    ids = list(range(5, 45))
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=4, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 10})
    want = offline.generate({"prompt_token_ids": ids[-10:]}, SamplingParams(max_tokens=4, temperature=0))[0]
    assert r.usage.prompt_tokens == 10 and r.choices[0].text == want.outputs[0].text
    cut = offline.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, temperature=0,
                                                                    truncate_prompt_tokens=10))[0]
    assert cut.prompt_token_ids == ids[-10:] and cut.outputs[0].token_ids == want.outputs[0].token_ids
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hello there " * 9}],
                                       max_tokens=2, extra_body={"truncate_prompt_tokens": 7})
    assert r.usage.prompt_tokens == 7
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=2, extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == 40
    for extra, param in [({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                         ({"truncate_prompt_tokens": 5, "echo": True}, "truncate_prompt_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model_name, prompt=ids, max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param


def test_continuous_usage_stats(client, model_name):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage so far."""
    for create, kw in ((client.completions.create, {"prompt": "Hello"}),
                       (client.chat.completions.create, {"messages": [{"role": "user", "content": "Hello"}]})):
        chunks = list(create(model=model_name, max_tokens=5, stream=True, extra_body={"ignore_eos": True},
                             stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
        running = [c.usage.completion_tokens for c in chunks if c.choices]
        assert all(c.usage is not None for c in chunks) and running == sorted(running) and running[-1] == 5
        assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices
        if "messages" in kw:  # the role chunk, before any token: 0, as vLLM's
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage.completion_tokens == 0
        alone = list(create(model=model_name, max_tokens=3, stream=True,  # (only with include_usage, as vLLM reads it)
                            stream_options={"continuous_usage_stats": True}, **kw))
        assert all(c.usage is None for c in alone)


def test_allowed_token_ids_over_http(client, model_name):
    r = client.completions.create(model=model_name, prompt="Hello", max_tokens=8, temperature=1.0,
                                  extra_body={"allowed_token_ids": [40, 41, 42], "ignore_eos": True,
                                              "return_token_ids": True})
    assert set(r.choices[0].model_extra["token_ids"]) <= {40, 41, 42}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="Hello", max_tokens=2,
                                  extra_body={"allowed_token_ids": [10**8]})
    assert e.value.body["param"] == "allowed_token_ids"
    r = client.completions.create(model=model_name, prompt="Hello", max_tokens=12, temperature=0,
                                  extra_body={"bad_words": ["the", "quick brown"], "ignore_eos": True})
    assert r.usage.completion_tokens == 12
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="Hello", max_tokens=2, extra_body={"bad_words": [""]})
    assert e.value.body["param"] == "bad_words"
