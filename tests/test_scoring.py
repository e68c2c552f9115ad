"""Classifiers and rerankers: *ForSequenceClassification checkpoints and causal LMs given
classifier_from_token (Qwen3-Reranker's way), checked against transformers; vLLM's /classify,
/score and /rerank over HTTP, with the cohere client for /v1/rerank and /v2/rerank."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
import yaml

from tests.models import VOCAB, make_model, save_tokenizer
from tests.server_utils import ServerProcess
from tests.test_embeddings import make_embedding_model
from tests.test_fleet import wait_fleet
from tokenmill import LLM

KV = dict(kv_cache_memory_bytes=4 * 2**20)
PROMPTS = [[5, 17, 99, 3, 250, 41], [300, 12], list(range(3, 70))]
QUERY = "The quick brown fox"
DOCS = ["jumps over the lazy dog.", "Hello world! How are you today?", "Café crème brûlée", "def fib(n):"]


def make_classifier(path: str, arch: str, labels: list[str], **config) -> str:
    """A tiny random *ForSequenceClassification checkpoint with the test tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = {"llama": dict(model_type="llama"), "qwen3": dict(model_type="qwen3", head_dim=32),
            "qwen2": dict(model_type="qwen2", tie_word_embeddings=True)}[arch]
    cfg = AutoConfig.for_model(
        spec.pop("model_type"), vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.08,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)}, **spec, **config)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    return {
        "reranker": make_classifier(str(root / "reranker"), "llama", ["LABEL_0"]),
        "sentiment": make_classifier(str(root / "sentiment"), "qwen3", ["neg", "neu", "pos"]),
        "qwen2cls": make_classifier(str(root / "qwen2cls"), "qwen2", ["LABEL_0"]),
        "causal": make_model(str(root / "causal"), "qwen3"),
        "causal_tied": make_model(str(root / "causal_tied"), "qwen2"),  # (Qwen3-Reranker ties its embeddings)
        "embedder": make_embedding_model(str(root / "embedder")),
    }


def _hf_probs(path: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = [model(torch.tensor([p])).logits[0] for p in prompts]
    return [lg.sigmoid() if lg.numel() == 1 else lg.softmax(-1) for lg in logits]


def _yes_no(path: str) -> tuple[list[str], list[int]]:
    """Two tokens of the test vocabulary (as written in it), to play Qwen3-Reranker's no and yes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = [300, 301, 302]
    return tok.convert_ids_to_tokens(ids), ids


@pytest.mark.parametrize("name", ["reranker", "sentiment", "qwen2cls"])
def test_sequence_classifiers_match_transformers(dirs, name):
    llm = LLM(dirs[name], max_num_batched_tokens=32, **KV)  # (chunked: the long prompt takes 3 steps)
    assert llm.engine.task == "classify"
    outs = llm.classify([{"prompt_token_ids": p} for p in PROMPTS])
    for out, ref in zip(outs, _hf_probs(dirs[name], PROMPTS)):
        torch.testing.assert_close(torch.tensor(out.probs), ref, atol=1e-5, rtol=1e-4)
        assert out.outputs.probs == out.probs and out.outputs.num_classes == len(ref)  # (vLLM's shape)
    assert llm.engine.model_config.labels == (("neg", "neu", "pos") if name == "sentiment" else ("LABEL_0",))
    with pytest.raises(ValueError, match="classifier; use classify or score"):
        llm.generate("Hello")
    with pytest.raises(ValueError, match="with task='embed' to embed"):
        llm.embed("Hello")
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("name", ["causal", "causal_tied"])
def test_classifier_from_token_matches_the_causal_lm(dirs, name):
    from tests.models import hf_model

    ref = hf_model(dirs[name])
    with torch.no_grad():
        logits = [ref(torch.tensor([p])).logits[0, -1] for p in PROMPTS]
    tokens, ids = _yes_no(dirs[name])
    # Two tokens [no, yes]: one label, yes's probability against no alone.
    llm = LLM(dirs[name], classifier_from_token=tokens[:2], **KV)
    assert llm.engine.task == "classify" and llm.engine.model_config.labels == (tokens[1],)
    assert llm.engine.runner.model.lm_head is None
    for out, lg in zip(llm.classify([{"prompt_token_ids": p} for p in PROMPTS]), logits):
        want = lg[ids[:2]].softmax(-1)[1]
        assert out.probs == pytest.approx([want.item()], abs=1e-5)
    # Three: one label each, softmaxed among them.
    llm = LLM(dirs[name], classifier_from_token=tokens, **KV)
    for out, lg in zip(llm.classify([{"prompt_token_ids": p} for p in PROMPTS]), logits):
        torch.testing.assert_close(torch.tensor(out.probs), lg[ids].softmax(-1), atol=1e-5, rtol=1e-4)


def test_offline_score(dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["reranker"])
    llm = LLM(dirs["reranker"], **KV)
    outs = llm.score(QUERY, DOCS)
    pairs = [tok(QUERY, d)["input_ids"] for d in DOCS]
    assert [o.prompt_token_ids for o in outs] == pairs
    refs = _hf_probs(dirs["reranker"], pairs)
    assert [o.outputs.score for o in outs] == pytest.approx([r.item() for r in refs], abs=1e-5)
    # Pairs in order; truncated to the limit, the longer text first.
    two = llm.score(DOCS[:2], DOCS[2:], truncate_prompt_tokens=6)
    assert [len(o.prompt_token_ids) for o in two] == [6, 6]
    with pytest.raises(ValueError, match="2 texts against 3"):
        llm.score(DOCS[:2], DOCS[:3])
    with pytest.raises(ValueError, match="3 labels"):
        LLM(dirs["sentiment"], **KV).score(QUERY, DOCS)

    emb = LLM(dirs["embedder"], **KV)
    vecs = [torch.tensor(o.embedding) for o in emb.embed([QUERY] + DOCS)]
    got = [o.outputs.score for o in emb.score(QUERY, DOCS)]
    assert got == pytest.approx([float(vecs[0] @ v) for v in vecs[1:]], abs=1e-5)


def test_task_errors(dirs):
    with pytest.raises(ValueError, match="no classification head"):
        LLM(dirs["causal"], task="classify", **KV)
    with pytest.raises(ValueError, match="sequence classifier without an LM head"):
        LLM(dirs["reranker"], task="generate", **KV)
    with pytest.raises(ValueError, match="not one token of the vocabulary"):
        LLM(dirs["causal"], classifier_from_token=["no", "The quick brown fox"], **KV)
    with pytest.raises(ValueError, match="sequence classifier already"):
        LLM(dirs["reranker"], classifier_from_token=["a", "b"], **KV)
    with pytest.raises(ValueError, match="two or more tokens"):
        LLM(dirs["causal"], classifier_from_token=["yes"], **KV)
    # A classifier may still embed: its body's last hidden state, normalized.
    assert LLM(dirs["sentiment"], task="embed", **KV).embed("Hello")[0].embedding is not None


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("scoring_server")
    tokens, _ = _yes_no(dirs["causal"])
    doc = {"memory_budget": 1.0, "models": [
        {"name": "reranker", "path": dirs["reranker"], "kv_cache_memory": 0.01},
        {"name": "sentiment", "path": dirs["sentiment"], "kv_cache_memory": 0.01},
        {"name": "judge", "path": dirs["causal"], "kv_cache_memory": 0.01, "classifier_from_token": tokens[:2]},
        {"name": "embedder", "path": dirs["embedder"], "kv_cache_memory": 0.01},
        {"name": "gen", "path": dirs["causal"], "kv_cache_memory": 0.01}]}
    path = d / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    srv = ServerProcess(None, "--models", str(path), log_path=str(d / "server.log"))
    yield srv
    srv.stop()


def _post(server, path, body):
    return httpx.post(server.base_url + path, json=body, timeout=60)


def test_classify_endpoint(server, dirs):
    r = _post(server, "/classify", {"model": "sentiment", "input": ["Hello world", "Café crème"]})
    assert r.status_code == 200, r.text
    body = r.json()
    offline = LLM(dirs["sentiment"], **KV).classify(["Hello world", "Café crème"])
    assert body["object"] == "list" and body["id"].startswith("classify-")
    for item, out in zip(body["data"], offline):
        assert item["probs"] == pytest.approx(out.probs, abs=1e-6)
        assert item["num_classes"] == 3 and item["label"] == ["neg", "neu", "pos"][out.probs.index(max(out.probs))]
    assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in offline)
    ids = _post(server, "/v1/classify", {"model": "sentiment", "input": [[5, 6, 7], [8, 9]]})
    assert ids.status_code == 200 and len(ids.json()["data"]) == 2


def test_score_and_rerank_endpoints(server, dirs):
    offline = [o.outputs.score for o in LLM(dirs["reranker"], **KV).score(QUERY, DOCS)]
    for path in ("/score", "/v1/score"):
        r = _post(server, path, {"model": "reranker", "text_1": QUERY, "text_2": DOCS})
        assert r.status_code == 200, r.text
        assert [d["score"] for d in r.json()["data"]] == pytest.approx(offline, abs=1e-6)
    # vLLM's other names for the two sides, and pairs in order
    r = _post(server, "/score", {"model": "reranker", "queries": [QUERY, QUERY], "documents": DOCS[:2]})
    assert [d["score"] for d in r.json()["data"]] == pytest.approx(offline[:2], abs=1e-6)
    order = sorted(range(len(DOCS)), key=lambda i: -offline[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = _post(server, path, {"model": "reranker", "query": QUERY, "documents": DOCS, "top_n": 2})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert [x["index"] for x in res] == order[:2]
        assert [x["relevance_score"] for x in res] == pytest.approx([offline[i] for i in order[:2]], abs=1e-6)
        assert res[0]["document"] == {"text": DOCS[order[0]]}
    r = _post(server, "/rerank", {"model": "reranker", "query": QUERY, "documents": [{"text": d} for d in DOCS],
                                  "return_documents": False})
    assert [x["index"] for x in r.json()["results"]] == order and "document" not in r.json()["results"][0]
    # The causal LM reranker (classifier_from_token) and the embedding model
    judge = LLM(dirs["causal"], classifier_from_token=_yes_no(dirs["causal"])[0][:2], **KV)
    r = _post(server, "/rerank", {"model": "judge", "query": QUERY, "documents": DOCS})
    want = [o.outputs.score for o in judge.score(QUERY, DOCS)]
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(dict(enumerate(want)))
    emb = [o.outputs.score for o in LLM(dirs["embedder"], **KV).score(QUERY, DOCS)]
    r = _post(server, "/v1/score", {"model": "embedder", "text_1": QUERY, "text_2": DOCS})
    assert [d["score"] for d in r.json()["data"]] == pytest.approx(emb, abs=1e-5)


@pytest.mark.parametrize("path,body,status,match", [
    ("/score", {"model": "sentiment", "text_1": "a", "text_2": "b"}, 400, "3 labels"),
    ("/score", {"model": "gen", "text_1": "a", "text_2": "b"}, 400, "scores no pairs"),
    ("/score", {"model": "reranker", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "2 texts against 3"),
    ("/score", {"model": "reranker", "text_1": "a"}, 400, "give exactly one of text_2"),
    ("/score", {"model": "reranker", "text_1": "a", "queries": "b", "text_2": "c"}, 400, "got text_1, queries"),
    ("/rerank", {"model": "reranker", "query": "a", "documents": []}, 400, "documents: no texts"),
    ("/rerank", {"model": "reranker", "query": "a", "documents": ["b"], "top_n": -1}, 400, "top_n"),
    ("/rerank", {"model": "reranker", "query": "a", "documents": [""] * 2, "truncate_prompt_tokens": 0}, 400,
     "truncate_prompt_tokens"),
    ("/classify", {"model": "embedder", "input": "a"}, 400, "not a classifier"),
    ("/classify", {"model": "reranker", "input": []}, 400, "input"),
    ("/v1/embeddings", {"model": "sentiment", "input": "a"}, 400, "a classifier, which has no embeddings"),
    ("/v1/completions", {"model": "judge", "prompt": "a"}, 400, "runs the classifier `judge`"),
    ("/v1/rerank", {"model": "nope", "query": "a", "documents": ["b"]}, 404, "nope"),
])
def test_errors(server, path, body, status, match):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]


def test_cohere_client(server, dirs):
    """Cohere's own client, as RAG stacks call a reranker: /v1/rerank (ClientV1) and /v2/rerank."""
    import cohere

    offline = [o.outputs.score for o in LLM(dirs["reranker"], **KV).score(QUERY, DOCS)]
    order = sorted(range(len(DOCS)), key=lambda i: -offline[i])
    for client in (cohere.ClientV2(api_key="unused", base_url=server.base_url),
                   cohere.Client(api_key="unused", base_url=server.base_url)):
        res = client.rerank(model="reranker", query=QUERY, documents=DOCS, top_n=3)
        assert [r.index for r in res.results] == order[:3]
        assert [r.relevance_score for r in res.results] == pytest.approx([offline[i] for i in order[:3]], abs=1e-6)


def test_metrics_count_pooled_prompts(server):
    before = server.metric("tokenmill:prompt_tokens_total")
    r = _post(server, "/score", {"model": "reranker", "text_1": "Hello", "text_2": ["world", "again"]})
    assert r.status_code == 200
    assert server.metric("tokenmill:prompt_tokens_total") - before == r.json()["usage"]["prompt_tokens"]
    models = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x").models.list()
    assert {"reranker", "judge", "embedder"} <= {m.id for m in models.data}


def test_through_the_fleet_router(server, tmp_path):
    """The router relays the pooling endpoints at each of their paths (and counts them as requests)."""
    router = ServerProcess(None, "--replica", server.base_url, "--health-interval", "0.2", "--health-timeout", "5",
                           log_path=str(tmp_path / "router.log"), command="router")
    try:
        wait_fleet(router, [server.base_url])
        direct = _post(server, "/rerank", {"model": "reranker", "query": QUERY, "documents": DOCS}).json()
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r = _post(router, path, {"model": "reranker", "query": QUERY, "documents": DOCS})
            assert r.status_code == 200, r.text
            assert r.json()["results"] == direct["results"]
        assert _post(router, "/v1/score", {"model": "embedder", "text_1": "a", "text_2": "b"}).status_code == 200
        assert _post(router, "/classify", {"model": "sentiment", "input": "a"}).status_code == 200
        bad = _post(router, "/score", {"model": "gen", "text_1": "a", "text_2": "b"})
        assert bad.status_code == 400 and "scores no pairs" in bad.json()["error"]["message"]
    finally:
        router.stop()


def test_classifier_from_token_flag():
    from tokenmill.cli import build_parser
    from tokenmill.engine_args import engine_config_from_args

    parse = build_parser().parse_args
    cfg = engine_config_from_args(parse(["serve", "--model", "m", "--classifier-from-token", "no, yes"]))
    assert cfg.classifier_from_token == ["no", "yes"]
    cfg = engine_config_from_args(parse(["serve", "--model", "m", "--classifier-from-token", '["a,b", "c"]']))
    assert cfg.classifier_from_token == ["a,b", "c"]
    with pytest.raises(ValueError, match="task 'generate' contradicts it"):
        engine_config_from_args(parse(["serve", "--model", "m", "--task", "generate", "--classifier-from-token",
                                       "no,yes"])).validate()


def test_pair_truncation_leaves_the_shared_tokenizer_alone(dirs):
    """A pair is cut the longer text first (transformers' longest_first) without switching the
    tokenizer's own truncation on: other requests' encodes share that tokenizer."""
    from transformers import AutoTokenizer

    from tokenmill.scoring import cosine, pair_ids

    tok = AutoTokenizer.from_pretrained(dirs["reranker"])
    long = "The quick brown fox jumps over the lazy dog. " * 20
    full = len(tok.encode(long, add_special_tokens=False))
    ids = pair_ids(tok, long, "Hello world", 20)
    assert len(ids) == 20 and tok.backend_tokenizer.truncation is None  # (another thread's encode sees no cut)
    assert len(tok.encode(long, add_special_tokens=False)) == full
    assert ids[-len(tok.encode("Hello world", add_special_tokens=False)):] == tok.encode("Hello world",
                                                                                       add_special_tokens=False)
    assert pair_ids(None, [1] * 5, [2] * 3, 6) == [1, 1, 1, 2, 2, 2]
    assert pair_ids(None, [1] * 2, [2] * 3, 4) == [1, 1, 2, 2]
    assert cosine([0.6, 0.8], [0.6, 0.8]) <= 1.0
    llm = LLM(dirs["reranker"], **KV)
    for k in (0, -2):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            llm.score([1, 2, 3, 4, 5], [6, 7, 8], truncate_prompt_tokens=k)


def test_classifier_from_token_never_allocates_the_lm_head(dirs):
    tokens, _ = _yes_no(dirs["causal"])
    llm = LLM(dirs["causal"], classifier_from_token=tokens[:2], **KV)
    model, mc = llm.engine.runner.model, llm.engine.model_config
    assert model.lm_head is None and mc.labels == (tokens[1],)
    assert max(p.shape[0] for n, p in model.named_parameters() if n != "embed_tokens.weight") < mc.vocab_size
    assert sum(p.numel() for p in model.parameters()) == mc.num_parameters


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_problem_type_sets_the_activation(tmp_path, problem_type):
    from transformers import AutoModelForSequenceClassification

    labels = ["a"] if problem_type == "regression" else ["a", "b", "c"]
    path = make_classifier(str(tmp_path / "m"), "qwen3", labels, problem_type=problem_type)
    ref = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = [ref(torch.tensor([p])).logits[0] for p in PROMPTS]
    want = logits if problem_type == "regression" else [lg.sigmoid() for lg in logits]
    for out, w in zip(LLM(path, **KV).classify([{"prompt_token_ids": p} for p in PROMPTS]), want):
        torch.testing.assert_close(torch.tensor(out.outputs.probs), w, atol=1e-5, rtol=1e-4)
