"""Chat templates from outside the tokenizer: the server's --chat-template (a file or the text),
a request's own chat_template (only with --trust-request-chat-template) and vLLM's `documents`,
which RAG templates render; offline as LLM(chat_template=...) and LLM.chat(chat_template=...)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.models import make_model
from tests.server_utils import ServerProcess
from tokenmill import LLM, SamplingParams

KV = dict(kv_cache_memory_bytes=4 * 2**20)
# A RAG-style template: documents first, then the conversation.
RAG_TEMPLATE = (
    "{% if documents %}{% for d in documents %}<doc {{ d['title'] }}>{{ d['text'] }}</doc>\n{% endfor %}{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
REQUEST_TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
MESSAGES = [{"role": "user", "content": "Hello world"}]
DOCS = [{"title": "fox", "text": "The quick brown fox"}]


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    """A model whose tokenizer has no chat template."""
    return make_model(str(tmp_path_factory.mktemp("tmpl") / "bare"), "llama", chat_template=None)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tmplfile") / "rag.jinja"
    path.write_text(RAG_TEMPLATE)
    return str(path)


def test_offline(bare_dir, template_file):
    with pytest.raises(ValueError, match="no chat template"):
        LLM(bare_dir, **KV).chat_prompt(MESSAGES)
    for value in (template_file, RAG_TEMPLATE):
        llm = LLM(bare_dir, chat_template=value, **KV)
        assert llm.chat_prompt(MESSAGES)["prompt"] == "[user] Hello world\n[assistant] "
    assert llm.chat_prompt(MESSAGES, chat_template=REQUEST_TEMPLATE)["prompt"] == "<<Hello world>>"
    out = llm.chat(MESSAGES, SamplingParams(max_tokens=3, temperature=0), chat_template=REQUEST_TEMPLATE)
    assert out[0].prompt == "<<Hello world>>"
    with pytest.raises(ValueError, match="cannot be read as a file"):
        LLM(bare_dir, chat_template="no/such/template.jinja", **KV)


@pytest.fixture(scope="module")
def server(bare_dir, template_file, tmp_path_factory):
    srv = ServerProcess(bare_dir, "--chat-template", template_file, "--trust-request-chat-template",
                        "--kv-cache-memory", "0.01", "--metric-names", "vllm",
                        log_path=str(tmp_path_factory.mktemp("tmpl_srv") / "log"))
    yield srv
    srv.stop()


def _tokenize(srv, **body):
    r = httpx.post(srv.base_url + "/tokenize", json={"messages": MESSAGES, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_server_templates_and_documents(server, bare_dir, template_file):
    llm = LLM(bare_dir, chat_template=template_file, **KV)
    tok = llm.get_tokenizer()
    assert _tokenize(server) == tok.encode("[user] Hello world\n[assistant] ", add_special_tokens=False)
    assert _tokenize(server, documents=DOCS) == tok.encode(
        "<doc fox>The quick brown fox</doc>\n[user] Hello world\n[assistant] ", add_special_tokens=False)
    assert _tokenize(server, chat_template=REQUEST_TEMPLATE) == tok.encode("<<Hello world>>", add_special_tokens=False)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=2,
                                       temperature=0, extra_body={"documents": DOCS})
    assert r.usage.prompt_tokens == len(tok.encode("<doc fox>The quick brown fox</doc>\n[user] Hello world\n"
                                                   "[assistant] ", add_special_tokens=False))


def test_request_template_refused_without_the_flag(model_dir, tmp_path):
    """The suite's usual server (no --trust-request-chat-template): a request's template is a 400,
    on chat and /tokenize alike; documents are fine."""
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.01", log_path=str(tmp_path / "log"))
    try:
        for path, body in (("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}),
                           ("/tokenize", {"messages": MESSAGES})):
            r = httpx.post(srv.base_url + path, json={**body, "chat_template": REQUEST_TEMPLATE}, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "chat_template"
            assert "--trust-request-chat-template" in r.json()["error"]["message"]
        ok = httpx.post(srv.base_url + "/tokenize", json={"messages": MESSAGES, "documents": DOCS}, timeout=30)
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_vllm_metric_names(server):
    """--metric-names vllm (this module's server): /metrics under vLLM's names, as tools built for
    vLLM read them; the dashboard's feed keeps tokenmill's."""
    httpx.post(server.base_url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
            "vllm:request_time_per_output_token_seconds_count", "vllm:time_to_first_token_seconds_bucket"} <= names
    assert not any(n.startswith("tokenmill:") for n in names)
    assert server.metric("vllm:prompt_tokens_total") > 0
    assert "tokenmill:prompt_tokens" in httpx.get(server.base_url + "/dashboard/data", timeout=10).text


def test_the_router_never_renders_a_requests_template(bare_dir, template_file, tmp_path):
    """A request's own chat_template is the replica's to refuse or run: the router's prompt hashing
    skips it (a template can hold the event loop for minutes), and a models.yaml template file is
    the file's folder's, as its paths are."""
    from tokenmill.config import EngineConfig
    from tokenmill.router.index import PromptHasher
    from tokenmill.server.models_file import read_models_file

    hasher = PromptHasher(bare_dir)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    assert hasher.token_ids("chat", {"messages": MESSAGES, "chat_template": slow}) is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.jinja").write_text(REQUEST_TEMPLATE)
    (tmp_path / "sub" / "models.yaml").write_text(f"models:\n  - path: {bare_dir}\n    chat_template: t.jinja\n")
    (m,), _, _ = read_models_file(str(tmp_path / "sub" / "models.yaml"), EngineConfig(model=""), probe_device=False)
    m.config.validate()  # (reads the file: from the yaml's folder, wherever the server was started)
    assert m.config.chat_template == REQUEST_TEMPLATE
