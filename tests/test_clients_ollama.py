"""Ollama's API over the OpenAI routes, driven by the ollama library itself: chat and generate,
streamed (Ollama's default) and not, options, format, tools, embeddings, the model list, and
errors in Ollama's shape; the text matches the OpenAI route's for the same request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import yaml

from tests.models import TOOLS_CHAT_TEMPLATE, make_model
from tests.server_utils import ServerProcess
from tests.test_embeddings import make_embedding_model

ollama = pytest.importorskip("ollama")

MESSAGES = [{"role": "user", "content": "Hello world"}]
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ollama")
    gen = make_model(str(d / "gen"), "qwen2", chat_template=TOOLS_CHAT_TEMPLATE)
    emb = make_embedding_model(str(d / "emb"))
    (d / "models.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "gen", "path": gen, "kv_cache_memory": 0.02, "tool_call_parser": "hermes"},
        {"name": "emb", "path": emb, "kv_cache_memory": 0.02}]}))
    srv = ServerProcess(None, "--models", str(d / "models.yaml"), log_path=str(d / "server.log"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base_url)


def _openai(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def test_chat_streamed_and_not_matches_the_openai_route(server, client):
    want = _openai(server).chat.completions.create(model="gen", messages=MESSAGES, temperature=0, max_tokens=8)
    whole = client.chat(model="gen", messages=MESSAGES, options=GREEDY, stream=False)
    assert whole.message.content == want.choices[0].message.content and whole.done
    assert whole.done_reason == "length" and whole.eval_count == 8
    assert whole.prompt_eval_count == want.usage.prompt_tokens and whole.eval_duration > 0
    parts = list(client.chat(model="gen", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == want.choices[0].message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].eval_count == 8
    # Options: seed and stop map onto the OpenAI fields
    seeded = {"temperature": 1.0, "seed": 7, "num_predict": 6}
    a, b = (client.chat(model="gen", messages=MESSAGES, options=seeded).message.content for _ in range(2))
    assert a == b


def test_generate_templated_and_raw(server, client):
    oa = _openai(server)
    want = oa.chat.completions.create(model="gen", messages=[{"role": "system", "content": "Be brief."}] + MESSAGES,
                                      temperature=0, max_tokens=6)
    r = client.generate(model="gen", prompt="Hello world", system="Be brief.", options={"temperature": 0,
                                                                                        "num_predict": 6})
    assert r.response == want.choices[0].message.content
    raw = oa.completions.create(model="gen", prompt="Hello world", temperature=0, max_tokens=6)
    parts = list(client.generate(model="gen", prompt="Hello world", raw=True, stream=True,
                                 options={"temperature": 0, "num_predict": 6}))
    assert "".join(p.response for p in parts) == raw.choices[0].text and parts[-1].done
    assert client.generate(model="gen", prompt="").done_reason == "load"  # (Ollama's way to preload)


def test_format_and_tools(server, client):
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    r = client.chat(model="gen", messages=MESSAGES, format=schema, options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(r.message.content)["a"], bool)
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": params}}
    # (a random model calls no tool on its own: what is checked is an earlier call and its result, in
    # Ollama's shape, going through the template)
    history = MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    r = client.chat(model="gen", messages=history, tools=[tool], options=GREEDY)
    tokens = httpx.post(server.base_url + "/tokenize", json={"model": "gen", "messages": [
        MESSAGES[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c"}], "tools": [tool]}, timeout=30).json()
    assert r.done and r.prompt_eval_count == tokens["count"]


def test_embed_and_models(server, client):
    r = client.embed(model="emb", input=["Hello world", "Café crème"])
    want = _openai(server).embeddings.create(model="emb", input=["Hello world", "Café crème"])
    assert [pytest.approx(v, abs=1e-6) for v in r.embeddings] == [d.embedding for d in want.data]
    assert r.prompt_eval_count == want.usage.prompt_tokens
    assert client.embeddings(model="emb", prompt="Hello world").embedding == pytest.approx(r.embeddings[0], abs=1e-6)
    names = {m.model for m in client.list().models}
    assert names == {"gen", "emb"}
    shown = client.show("gen")
    assert shown.details.family == "qwen2" and "tools" in shown.capabilities
    assert shown.modelinfo["qwen2.context_length"] > 0
    assert {m.model for m in client.ps().models} <= names
    assert httpx.get(server.base_url + "/api/version").json()["version"]


def test_errors_in_ollamas_shape(server, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=MESSAGES)
    assert e.value.status_code == 404 and "not found" in e.value.error
    # (Ollama's defaults as clients send them, and an option unknown here, which Ollama logs and ignores)
    ok = client.chat(model="gen", messages=MESSAGES, options={**GREEDY, "mirostat": 0, "num_ctx": 4096, "tfs_z": None,
                                                             "draft_num_predict": 4})
    assert ok.done
    for body, match in (({"model": "gen", "messages": MESSAGES, "options": {"mirostat": 2}}, "options.mirostat"),
                        ({"model": "gen", "messages": MESSAGES, "format": "yaml"}, "format"),
                        ({"model": "gen", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
                         "images"),
                        ({"messages": MESSAGES}, "model is required"),
                        ({"model": "emb", "messages": MESSAGES, "stream": False}, "embedding model")):
        r = httpx.post(server.base_url + "/api/chat", json=body, timeout=30)
        assert r.status_code == 400 and match in r.json()["error"], r.text
    r = httpx.post(server.base_url + "/api/pull", json={"model": "llama3"}, timeout=30)
    assert r.status_code == 404 and "model store" in r.json()["error"]


def test_langchain_chat_ollama(server):
    """LangChain's ChatOllama and OllamaEmbeddings, pointed at tokenmill."""
    from langchain_ollama import ChatOllama, OllamaEmbeddings

    llm = ChatOllama(model="gen", base_url=server.base_url, temperature=0, num_predict=8)
    want = _openai(server).chat.completions.create(model="gen", messages=MESSAGES, temperature=0, max_tokens=8)
    assert llm.invoke("Hello world").content == want.choices[0].message.content
    assert "".join(c.content for c in llm.stream("Hello world")) == want.choices[0].message.content
    vec = OllamaEmbeddings(model="emb", base_url=server.base_url).embed_query("Hello world")
    assert vec == pytest.approx(_openai(server).embeddings.create(model="emb", input="Hello world").data[0].embedding,
                                abs=1e-6)


def test_a_client_that_leaves_mid_stream_frees_its_request(server):
    import time

    body = {"model": "gen", "messages": MESSAGES, "options": {"num_predict": 900, "temperature": 1.0}}
    before = server.metric("tokenmill:generation_tokens_total")
    with httpx.stream("POST", server.base_url + "/api/chat", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
        next(lines)
    deadline = time.time() + 20
    while time.time() < deadline and server.metric("tokenmill:num_requests_running") > 0:
        time.sleep(0.2)
    assert server.metric("tokenmill:num_requests_running") == 0
    assert server.metric("tokenmill:kv_cache_usage_perc") == 0
    assert server.metric("tokenmill:generation_tokens_total") - before < 900  # (aborted, not run to its end)


def test_review_cases(server, client):
    """Bodies: a chunked one over --max-body-size is cut off as it arrives (413), a compact one just
    under it passes; bad fields are 400s; a load request checks the model; ids of tool calls
    survive; HEAD and / answer as Ollama's do."""
    def chunks(n):
        yield b'{"model": "gen", "messages": [{"role": "user", "content": "'
        for _ in range(n):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(server.base_url + "/api/chat", content=chunks(200), timeout=60)  # (13 MB, limit 8 MiB)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
    for body, match in (({"model": "gen", "messages": MESSAGES, "logprobs": True, "top_logprobs": "x"},
                         "top_logprobs"),
                        ({"model": "gen", "messages": [{"role": "assistant", "content": "",
                                                        "tool_calls": [{"function": "x"}]}]}, "tool_calls[0]")):
        r = httpx.post(server.base_url + "/api/chat", json=body, timeout=30)
        assert r.status_code == 400 and match in r.json()["error"], r.text
    r = httpx.post(server.base_url + "/api/generate", json={"model": "nope", "prompt": ""}, timeout=30)
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert client.generate(model="gen", prompt="").done_reason == "load"
    from tokenmill.server.routes.ollama import _messages

    sent = _messages([{"role": "User", "content": "hi"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"id": "abc123XYZ", "function": {"name": "f", "arguments": {"a": 1}}},
                          {"function": {"name": "g", "arguments": {}}}]},
                      {"role": "tool", "content": "1", "tool_call_id": "abc123XYZ"},
                      {"role": "tool", "content": "2", "tool_name": "g"}])
    assert sent[0]["role"] == "user" and sent[1]["tool_calls"][0]["id"] == "abc123XYZ"
    assert sent[2]["tool_call_id"] == "abc123XYZ" and sent[3]["tool_call_id"] == sent[1]["tool_calls"][1]["id"]
    for path in ("/api/tags", "/api/version", "/"):
        assert httpx.head(server.base_url + path, timeout=10).status_code == 200


def test_through_the_fleet_router(server, client, tmp_path):
    """tokenmill router relays Ollama's streams line by line (and the rest as other traffic)."""
    from tests.test_fleet import wait_fleet

    router = ServerProcess(None, "--replica", server.base_url, "--health-interval", "0.2", "--health-timeout", "5",
                           log_path=str(tmp_path / "router.log"), command="router")
    try:
        wait_fleet(router, [server.base_url])
        via = ollama.Client(host=router.base_url)
        direct = client.chat(model="gen", messages=MESSAGES, options=GREEDY, stream=False)
        parts = list(via.chat(model="gen", messages=MESSAGES, options=GREEDY, stream=True))
        assert len(parts) >= 2 and "".join(p.message.content for p in parts) == direct.message.content
        assert parts[-1].done and parts[-1].eval_count == 8
        assert via.generate(model="gen", prompt="Hello world", options=GREEDY).response == client.generate(
            model="gen", prompt="Hello world", options=GREEDY).response
        assert {m.model for m in via.list().models} == {"gen", "emb"}
        with pytest.raises(ollama.ResponseError) as e:
            list(via.chat(model="nope", messages=MESSAGES, stream=True))
        assert e.value.status_code == 404
    finally:
        router.stop()
