"""RAG in the loop: OpenAI's Files and Vector Stores APIs and the Responses API's file_search tool,
through real servers with the official openai client. Chunks are checked against the embedding
model's tokenizer, search scores and rankings against transformers' embeddings of the same texts,
attribute filters against a brute-force evaluation, and file_search prompts against transformers'
greedy answer to the prompt the excerpts should make. Then tokenmill/rag's chunking and filters
alone (filters on an in-memory Qdrant)."""

from __future__ import annotations

import io
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import yaml

from tests.models import hf_greedy, hf_model, make_model, save_tokenizer
from tests.server_utils import ServerProcess
from tests.test_embeddings import make_embedding_model
from tokenmill.ops.tenants import hash_key
from tokenmill.rag.chunking import Chunking, chunk_text
from tokenmill.rag.filters import MAX_DEPTH, to_qdrant

# A RAG chat template: the excerpts come as the template's `documents` (title: the file's name).
DOCS_TEMPLATE = (
    "{% if documents %}<s>system\n{% for d in documents %}[{{ d['title'] }}] {{ d['text'] }}\n{% endfor %}</s>\n"
    "{% endif %}{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
WORDS = ("apple river stone cloud quick brown fox lazy dog hello world table garden music silver orange planet "
         "ocean forest candle window mountain yellow").split()
STATIC = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20}}
MAX_LEN = 512  # the servers' context: room for the answer is min(512, 512 // 4) = 128 by default
POLL = 20  # ms between the client's polls
KEYS = {"a": "key-a", "b": "key-b"}


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def api(server: ServerProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def upload(client: openai.OpenAI, name: str, data: str | bytes, purpose: str = "assistants"):
    data = data.encode() if isinstance(data, str) else data
    return client.files.create(file=(name, io.BytesIO(data)), purpose=purpose)


def wait_store(client: openai.OpenAI, vs_id: str, timeout: float = 60):
    deadline = time.time() + timeout
    while (vs := client.vector_stores.retrieve(vs_id)).status == "in_progress":
        assert time.time() < deadline, vs
        time.sleep(POLL / 1000)
    return vs


def wait_chunks(client: openai.OpenAI, vs_id: str, n: int = 20, timeout: float = 60) -> None:
    """Until the store finds at least n chunks (a big file being embedded: some of its chunks are in)."""
    deadline = time.time() + timeout
    while len(client.vector_stores.search(vs_id, query="apple", max_num_results=50).data) < n:
        assert time.time() < deadline
        time.sleep(0.01)


def start_servers(specs: dict[str, tuple]) -> dict[str, ServerProcess]:
    """Several servers started at once (their start-ups overlap)."""
    with ThreadPoolExecutor(len(specs)) as ex:
        futures = {k: ex.submit(lambda s: ServerProcess(*s[0], **s[1]), s) for k, s in specs.items()}
    started, error = {}, None
    for k, f in futures.items():
        try:
            started[k] = f.result()
        except Exception as e:  # (the others are stopped)
            error = e
    if error is not None:
        for s in started.values():
            s.stop()
        raise error
    return started


# -- the servers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rag")
    return {"root": d, "gen": model_dir,
            "gen_docs": make_model(str(d / "gen_docs"), "llama", chat_template=DOCS_TEMPLATE),
            "emb": make_embedding_model(str(d / "emb"))}


@pytest.fixture(scope="module")
def servers(dirs):
    """main: a generative model with a plain template, one with a RAG template and an embedding
    model; bare: no embedding model; persist: a folder store with two tenants (restarted by its
    test, which keeps the one running in servers["persist"])."""
    d = dirs["root"]
    doc = {"tenants": [{"name": n, "keys_sha256": [hash_key(k)]} for n, k in KEYS.items()]
           + [{"name": "genonly", "keys_sha256": [hash_key("key-genonly")], "models": [os.path.basename(dirs["gen"])],
               "requests_per_minute": 2}]}
    (d / "tenants.yaml").write_text(yaml.safe_dump(doc))
    common = ("--kv-cache-memory", "0.0625", "--max-model-len", str(MAX_LEN))
    persist_args = ("--model", dirs["gen"], "--model", dirs["emb"], "--vector-store", str(d / "store"),
                    "--tenants", str(d / "tenants.yaml"), *common)
    found = start_servers({
        "main": ((None, "--model", dirs["gen"], "--model", dirs["gen_docs"], "--model", dirs["emb"], *common),
                 {"log_path": str(d / "main.log")}),
        "bare": ((None, "--model", dirs["gen"], *common), {"log_path": str(d / "bare.log")}),
        "persist": ((None, *persist_args), {"log_path": str(d / "persist.log")}),
    })
    found["persist_args"] = persist_args
    yield found
    procs = [found[k] for k in ("main", "bare", "persist")]
    with ThreadPoolExecutor(len(procs)) as ex:
        codes = list(ex.map(lambda s: s.stop(), procs))
    assert codes == [0, 0, 0], [s.log()[-3000:] for s in procs]


@pytest.fixture(scope="module")
def c(servers):
    return api(servers["main"])


@pytest.fixture(scope="module")
def names(dirs):
    return {k: os.path.basename(dirs[k]) for k in ("gen", "gen_docs", "emb")}


# -- transformers' side ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emb_tok(dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dirs["emb"])


@pytest.fixture(scope="module")
def embed(dirs, emb_tok):
    """Texts -> transformers' embeddings (as tests/test_embeddings.py's reference: the last token's
    hidden state, normalized; the text tokenized with special tokens)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(dirs["emb"], dtype=torch.float32).eval()
    cache: dict[str, torch.Tensor] = {}

    def run(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            for t in texts:
                if t not in cache:
                    ids = emb_tok.encode(t)
                    cache[t] = torch.nn.functional.normalize(model(torch.tensor([ids])).last_hidden_state[0, -1], dim=0)
        return torch.stack([cache[t] for t in texts])

    return run


@pytest.fixture(scope="module")
def gen_ref(dirs):
    """The RAG-template model in transformers: (the prompt ids of a conversation with documents,
    the greedy continuation of prompt ids as text)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs["gen_docs"])
    model = hf_model(dirs["gen_docs"])

    def ids(messages: list[dict], documents: list[dict] | None) -> list[int]:
        kw = {"documents": documents} if documents else {}
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        return tok.encode(text, add_special_tokens=False)

    def greedy(prompt: list[int], n: int) -> str:
        return tok.decode(hf_greedy(model, prompt, n), skip_special_tokens=True)

    return ids, greedy


# -- a store to search ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kb(c):
    """Three files of about 330 tokens each, chunked 100/20, in one store."""
    texts = {f"doc{i}.txt": words(10 + i, 80) for i in range(3)}
    files = {name: upload(c, name, t) for name, t in texts.items()}
    vs = c.vector_stores.create(name="kb", file_ids=[f.id for f in files.values()], chunking_strategy=STATIC,
                                metadata={"topic": "words"})
    assert vs.name == "kb" and vs.metadata == {"topic": "words"}
    vs = wait_store(c, vs.id)
    chunks = {f.id: [x.text for x in c.vector_stores.files.content(file_id=f.id, vector_store_id=vs.id)]
              for f in files.values()}
    return {"vs": vs, "texts": texts, "files": files, "chunks": chunks}


def all_chunks(kb) -> list[tuple[str, str]]:
    return [(fid, t) for fid, ts in kb["chunks"].items() for t in ts]


# -- 1. files ------------------------------------------------------------------------------------------
def test_files_api(servers):
    """The Files API needs no embedding model: served by the server without one."""
    c = api(servers["bare"])
    blobs = {"a.txt": (b"plain text\n", "assistants"), "b.jsonl": (b'{"x": 1}\n', "batch"),
             "c.bin": (bytes(range(256)) * 3, "user_data")}
    made = {}
    for name, (data, purpose) in blobs.items():
        f = upload(c, name, data, purpose)
        assert (f.object, f.filename, f.bytes, f.purpose, f.status) == ("file", name, len(data), purpose, "processed")
        assert f.id.startswith("file-") and abs(f.created_at - time.time()) < 60
        made[f.id] = (name, data)
    ids = list(made)
    asc = [f.id for f in c.files.list(order="asc")]
    desc = [f.id for f in c.files.list(order="desc")]
    assert sorted(asc) == sorted(ids) and desc == asc[::-1]
    created = [c.files.retrieve(i).created_at for i in asc]
    assert created == sorted(created)
    assert [f.filename for f in c.files.list(purpose="batch")] == ["b.jsonl"]
    assert list(c.files.list(purpose="fine-tune")) == []
    page = c.files.list(limit=1, order="asc")
    assert [f.id for f in page.data] == asc[:1] and page.has_more
    assert [f.id for f in c.files.list(limit=1, order="asc", after=asc[0]).data] == asc[1:2]
    assert [f.id for f in c.files.list(limit=2, order="asc", after=asc[0]).data] == asc[1:3]
    last = c.files.list(limit=2, order="asc", after=asc[1])
    assert [f.id for f in last.data] == asc[2:] and not last.has_more
    assert [f.id for f in c.files.list(limit=1, order="asc")] == asc  # (the client pages on with after)
    for fid, (name, data) in made.items():
        got = c.files.retrieve(fid)
        assert (got.id, got.filename, got.bytes) == (fid, name, len(data))
        assert c.files.content(fid).content == data  # (the exact bytes, binary too)
    gone = ids[0]
    assert c.files.delete(gone).deleted
    for call in (lambda: c.files.retrieve(gone), lambda: c.files.content(gone), lambda: c.files.delete(gone)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert sorted(f.id for f in c.files.list()) == sorted(ids[1:])
    with pytest.raises(openai.BadRequestError) as e:
        upload(c, "x.txt", b"x", purpose="homework")
    assert e.value.body["param"] == "purpose"
    for bad in ({"limit": 0}, {"limit": 10001}, {"order": "up"}, {"after": "file-nope"}):
        with pytest.raises(openai.BadRequestError) as e:
            c.files.list(**bad)
        assert e.value.body["param"] == next(iter(bad))


# -- 7. no embedding model -------------------------------------------------------------------------------
def test_vector_stores_need_an_embedding_model(servers):
    c = api(servers["bare"])
    with pytest.raises(openai.BadRequestError) as e:
        c.vector_stores.create(name="x")
    assert e.value.body["code"] == "no_embedding_model"
    assert list(c.vector_stores.list()) == []


# -- 2. chunks -------------------------------------------------------------------------------------------
def test_store_files_and_their_chunks(c, kb, emb_tok, names):
    vs = kb["vs"]
    assert vs.status == "completed" and vs.object == "vector_store"
    assert vs.model_extra["embedding_model"] == names["emb"]
    assert (vs.file_counts.completed, vs.file_counts.total, vs.file_counts.in_progress) == (3, 3, 0)
    listed = list(c.vector_stores.files.list(vs.id))
    assert sorted(f.id for f in listed) == sorted(f.id for f in kb["files"].values())
    usage = 0
    for name, f in kb["files"].items():
        text, chunks = kb["texts"][name], kb["chunks"][f.id]
        vsf = c.vector_stores.files.retrieve(file_id=f.id, vector_store_id=vs.id)
        assert vsf.status == "completed" and vsf.last_error is None
        assert vsf.chunking_strategy.static.max_chunk_size_tokens == 100
        assert vsf.chunking_strategy.static.chunk_overlap_tokens == 20
        assert vsf.usage_bytes == len(text.encode())  # (the text once, not the chunks' overlaps again)
        usage += vsf.usage_bytes
        # Each chunk is the exact slice of the file that a window of the embedding model's tokens
        # covers: at most 100 tokens, each window 80 tokens after the last (20 shared), the whole file.
        enc = emb_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(offsets)
        assert 300 < n < 400, n
        first = {s: i for i, (s, _) in enumerate(offsets)}
        last = {e: i for i, (_, e) in enumerate(offsets)}
        spans, at = [], 0
        for t in chunks:
            at = text.find(t, at)
            assert at >= 0, t
            spans.append((first[at], last[at + len(t)] + 1))
            at += 1
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(e - s == 100 for s, e in spans[:-1]) and spans[-1][1] - spans[-1][0] <= 100
        assert all(a[1] - b[0] == 20 for a, b in zip(spans, spans[1:]))
        assert len(chunks) == -(-(n - 100) // 80) + 1
    assert c.vector_stores.retrieve(vs.id).usage_bytes == usage


# -- 3. search against transformers ---------------------------------------------------------------------------
def test_search_matches_transformers(c, kb, embed):
    vs = kb["vs"]
    pool = all_chunks(kb)
    vectors = embed([t for _, t in pool])
    for query in ("apple river stone", ["hello world", "orange planet ocean"]):
        queries = [query] if isinstance(query, str) else query
        q = embed(queries)
        ref = (vectors @ q.T).max(dim=1).values  # (a chunk found by several queries: its best score)
        top = sorted(range(len(pool)), key=lambda i: -ref[i])
        k = next(k for k in (5, 4, 6, 3, 7) if ref[top[k - 1]] - ref[top[k]] > 1e-3)  # (no near tie at the cut)
        r = c.vector_stores.search(vs.id, query=query, max_num_results=k)
        assert r.search_query == queries
        got = [(x.file_id, x.content[0].text) for x in r.data]
        assert set(got) == {pool[i] for i in top[:k]}
        scores = [x.score for x in r.data]
        assert scores == sorted(scores, reverse=True)
        for x, (fid, text) in zip(r.data, got):
            assert x.score == pytest.approx(float(ref[pool.index((fid, text))]), abs=1e-4)
            assert x.filename == next(n for n, f in kb["files"].items() if f.id == fid)
    # score_threshold: every chunk scoring above it, and none below
    q = embed(["quick brown fox"])[0]
    ref = vectors @ q
    threshold = float(ref.sort(descending=True).values[3] + ref.sort(descending=True).values[4]) / 2
    r = c.vector_stores.search(vs.id, query="quick brown fox", max_num_results=50,
                               ranking_options={"score_threshold": threshold})
    assert {(x.file_id, x.content[0].text) for x in r.data} == {p for p, s in zip(pool, ref) if s >= threshold}
    assert len(r.data) == 4
    for bad in ({"query": ""}, {"query": "x", "max_num_results": 51}, {"query": ["x"] * 17}):
        with pytest.raises(openai.BadRequestError):
            c.vector_stores.search(vs.id, **bad)


# -- 4. filters ------------------------------------------------------------------------------------------
def matches(f: dict, attrs: dict) -> bool:
    """OpenAI's attribute filters, by brute force: strings, numbers (int or float alike) and
    booleans compare within their kind; a missing key equals nothing."""
    kind = f["type"]
    if kind in ("and", "or"):
        found = [matches(s, attrs) for s in f["filters"]]
        return all(found) if kind == "and" else any(found)

    def sort(v):
        return "bool" if isinstance(v, bool) else "num" if isinstance(v, (int, float)) else "str"

    key, value = f["key"], f["value"]
    missing = key not in attrs
    a = attrs.get(key)

    def eq(v):
        return not missing and sort(a) == sort(v) and a == v

    if kind == "eq":
        return eq(value)
    if kind == "ne":
        return not eq(value)
    if kind == "in":
        return any(eq(v) for v in value)
    if kind == "nin":
        return not any(eq(v) for v in value)
    if missing or sort(a) != "num":
        return False
    return {"gt": a > value, "gte": a >= value, "lt": a < value, "lte": a <= value}[kind]


FILTERS = [
    {"type": "eq", "key": "lang", "value": "en"},
    {"type": "ne", "key": "lang", "value": "en"},
    {"type": "eq", "key": "year", "value": 2020},
    {"type": "eq", "key": "year", "value": "2020"},  # (a string is not the number)
    {"type": "gt", "key": "year", "value": 2020},
    {"type": "gte", "key": "year", "value": 2020},
    {"type": "lt", "key": "year", "value": 2020.5},
    {"type": "lte", "key": "score", "value": 2.5},
    {"type": "gt", "key": "score", "value": 3},
    {"type": "eq", "key": "score", "value": 7.25},
    {"type": "eq", "key": "draft", "value": True},
    {"type": "ne", "key": "draft", "value": True},
    {"type": "in", "key": "lang", "value": ["en", "fr"]},
    {"type": "nin", "key": "lang", "value": ["en", "es"]},
    {"type": "in", "key": "year", "value": [2019, 2023, "x"]},
    {"type": "eq", "key": "batch", "value": "b1"},
    {"type": "and", "filters": [{"type": "eq", "key": "lang", "value": "en"},
                                {"type": "gte", "key": "year", "value": 2020}]},
    {"type": "or", "filters": [{"type": "eq", "key": "draft", "value": True},
                               {"type": "and", "filters": [{"type": "ne", "key": "lang", "value": "es"},
                                                           {"type": "lt", "key": "score", "value": 5}]}]},
]


@pytest.fixture(scope="module")
def tagged(c):
    """Seven one-chunk files with attributes, added one by one, in a batch of files each with its
    own, and in a batch of ids sharing the batch's."""
    attrs = [{"lang": "en", "year": 2020, "draft": False}, {"lang": "fr", "year": 2023, "score": 2.5},
             {"lang": "de", "year": 2019, "draft": True}, {"lang": "en", "score": 7.25},
             {"lang": "es", "year": 2021, "batch": "b1"}, {"lang": "es", "year": 2021, "batch": "b1"}, {}]
    files = [upload(c, f"t{i}.txt", words(100 + i, 12)) for i in range(len(attrs))]
    vs = c.vector_stores.create(name="tagged")
    for i in (0, 1):
        got = c.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=files[i].id, attributes=attrs[i],
                                                    poll_interval_ms=POLL)
        assert got.status == "completed" and got.attributes == attrs[i]
    b = c.vector_stores.file_batches.create(vs.id, files=[{"file_id": files[i].id, "attributes": attrs[i]}
                                                          for i in (2, 3)])
    assert b.object == "vector_store.files_batch"
    b2 = c.vector_stores.file_batches.create(vs.id, file_ids=[files[4].id, files[5].id], attributes=attrs[4])
    c.vector_stores.files.create(vector_store_id=vs.id, file_id=files[6].id)
    vs = wait_store(c, vs.id)
    assert vs.file_counts.completed == 7
    for batch in (b, b2):
        got = c.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id)
        assert got.status == "completed" and got.file_counts.completed == 2
        assert {f.id for f in c.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id)} == \
            {files[i].id for i in ((2, 3) if batch is b else (4, 5))}
    return {"vs": vs, "ids": [f.id for f in files], "attrs": attrs}


def search_ids(c, vs_id: str, flt: dict | None) -> set[str]:
    kw = {"filters": flt} if flt is not None else {}
    r = c.vector_stores.search(vs_id, query="apple", max_num_results=50, **kw)
    return {x.file_id for x in r.data}


def test_filters_find_what_brute_force_finds(c, tagged):
    vs, ids, attrs = tagged["vs"], tagged["ids"], tagged["attrs"]
    assert search_ids(c, vs.id, None) == set(ids)
    r = c.vector_stores.search(vs.id, query="apple", max_num_results=50)
    assert all(x.attributes == attrs[ids.index(x.file_id)] for x in r.data)
    for f in FILTERS:
        want = {i for i, a in zip(ids, attrs) if matches(f, a)}
        assert search_ids(c, vs.id, f) == want, f
    for bad in ({"type": "eq", "key": "lang"}, {"type": "and", "filters": []}, {"type": "gt", "key": "year",
                                                                                  "value": "x"},
                {"type": "like", "key": "lang", "value": "en"}, {"type": "in", "key": "lang", "value": []}):
        with pytest.raises(openai.BadRequestError) as e:
            c.vector_stores.search(vs.id, query="apple", filters=bad)
        assert e.value.body["param"] == "filters" and e.value.body["message"].startswith("filters"), bad


def test_filters_on_a_float_attribute(c, tagged):
    """A number is a number: an attribute sent as 3.0 (as a Python client sends a float) equals 3."""
    fid = upload(c, "f.txt", words(200, 12)).id
    vs = c.vector_stores.create(name="floats")
    attrs = {"n": 3.0, "m": 2}
    got = c.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=fid, attributes=attrs,
                                                poll_interval_ms=POLL)
    assert got.status == "completed"
    for f in ({"type": "eq", "key": "m", "value": 2.0}, {"type": "gte", "key": "n", "value": 3},
              {"type": "eq", "key": "n", "value": 3}, {"type": "eq", "key": "n", "value": 3.0},
              {"type": "in", "key": "n", "value": [1, 3]}, {"type": "ne", "key": "n", "value": 3}):
        assert search_ids(c, vs.id, f) == ({fid} if matches(f, attrs) else set()), f


def test_updating_attributes_changes_what_filters_find(c):
    files = [upload(c, f"u{i}.txt", words(300 + i, 12)).id for i in range(2)]
    vs = c.vector_stores.create(name="updates")
    c.vector_stores.file_batches.create_and_poll(vs.id, file_ids=files, attributes={"lang": "en", "year": 2020},
                                                 poll_interval_ms=POLL)
    year = {"type": "gt", "key": "year", "value": 2000}
    assert search_ids(c, vs.id, {"type": "eq", "key": "lang", "value": "fr"}) == set()
    assert search_ids(c, vs.id, year) == set(files)
    got = c.vector_stores.files.update(file_id=files[0], vector_store_id=vs.id, attributes={"lang": "fr"})
    assert got.attributes == {"lang": "fr"}
    assert c.vector_stores.files.retrieve(file_id=files[0], vector_store_id=vs.id).attributes == {"lang": "fr"}
    assert search_ids(c, vs.id, {"type": "eq", "key": "lang", "value": "fr"}) == {files[0]}
    assert search_ids(c, vs.id, year) == {files[1]}  # (the attributes are replaced, not merged)
    r = c.vector_stores.search(vs.id, query="x", filters={"type": "eq", "key": "lang", "value": "fr"})
    assert r.data[0].attributes == {"lang": "fr"}


def test_updating_attributes_while_the_file_is_embedded(c):
    """An update made while the file is still being embedded holds once it is done: the file
    keeps the new attributes, and so do all of its chunks."""
    fid = upload(c, "big.txt", words(400, 12000)).id  # (about 600 chunks: a second or so to embed)
    vs = c.vector_stores.create(name="racing")
    c.vector_stores.files.create(vector_store_id=vs.id, file_id=fid, attributes={"v": "old"},
                                 chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 100,
                                                                                 "chunk_overlap_tokens": 20}})
    got = c.vector_stores.files.update(file_id=fid, vector_store_id=vs.id, attributes={"v": "new"})
    assert got.status == "in_progress"  # (else this test tests nothing: make the file bigger)
    wait_store(c, vs.id)
    assert c.vector_stores.files.retrieve(file_id=fid, vector_store_id=vs.id).attributes == {"v": "new"}
    r = c.vector_stores.search(vs.id, query="apple", max_num_results=50)
    assert len(r.data) == 50 and all(x.attributes == {"v": "new"} for x in r.data)


# -- 5. errors ----------------------------------------------------------------------------------------------
def test_store_errors_and_deletes(c, kb):
    vs = c.vector_stores.create(name="errors")
    pdf = upload(c, "paper.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << >> endobj\n")
    blob = upload(c, "blob.bin", bytes(range(256)) * 4)
    for f in (pdf, blob):
        got = c.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=f.id, poll_interval_ms=POLL)
        assert got.status == "failed" and got.last_error.code == "unsupported_file", got
    counts = c.vector_stores.retrieve(vs.id).file_counts
    assert (counts.failed, counts.completed, counts.total) == (2, 0, 2)
    got = c.vector_stores.update(vs.id, name="renamed", metadata={"k": "v"})
    again = c.vector_stores.retrieve(vs.id)
    assert (got.name, got.metadata) == (again.name, again.metadata) == ("renamed", {"k": "v"})
    assert {f.id for f in c.vector_stores.files.list(vs.id, filter="failed")} == {pdf.id, blob.id}
    assert list(c.vector_stores.files.list(vs.id, filter="completed")) == []
    for bad, param in (({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}},
                        "chunking_strategy.static.max_chunk_size_tokens"),
                       ({"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 51}},
                        "chunking_strategy.static.chunk_overlap_tokens"),
                       ({"type": "semantic"}, "chunking_strategy.type"),
                       ({"type": "static"}, "chunking_strategy.static")):
        with pytest.raises(openai.BadRequestError) as e:
            c.vector_stores.create(name="x", chunking_strategy=bad)
        assert e.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as e:
            c.vector_stores.files.create(vector_store_id=vs.id, file_id=pdf.id, chunking_strategy=bad)
        assert e.value.body["param"] == param
    for call in (lambda: c.vector_stores.retrieve("vs_nope"), lambda: c.vector_stores.search("vs_nope", query="x"),
                 lambda: c.vector_stores.files.create(vector_store_id="vs_nope", file_id=pdf.id),
                 lambda: c.vector_stores.files.create(vector_store_id=vs.id, file_id="file-nope"),
                 lambda: c.vector_stores.create(name="x", file_ids=["file-nope"]),
                 lambda: c.vector_stores.files.retrieve(file_id=kb["files"]["doc0.txt"].id, vector_store_id=vs.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    # A file leaves a store, its chunks with it; the file itself stays.
    two = [upload(c, f"d{i}.txt", words(500 + i, 60)).id for i in range(2)]
    vs2 = c.vector_stores.create(name="two", file_ids=two, chunking_strategy=STATIC)
    wait_store(c, vs2.id)
    assert search_ids(c, vs2.id, None) == set(two)
    assert c.vector_stores.files.delete(file_id=two[0], vector_store_id=vs2.id).deleted
    assert search_ids(c, vs2.id, None) == {two[1]}
    assert [f.id for f in c.vector_stores.files.list(vs2.id)] == [two[1]]
    assert c.vector_stores.retrieve(vs2.id).file_counts.total == 1
    with pytest.raises(openai.NotFoundError):
        c.vector_stores.files.content(file_id=two[0], vector_store_id=vs2.id)
    assert c.files.retrieve(two[0]).id == two[0]
    # ... also while it is being embedded: none of its chunks stay, none come later.
    big = upload(c, "big.txt", words(501, 12000)).id
    c.vector_stores.files.create(vector_store_id=vs2.id, file_id=big, chunking_strategy=STATIC)
    wait_chunks(c, vs2.id)
    assert c.vector_stores.files.delete(file_id=big, vector_store_id=vs2.id).deleted
    assert search_ids(c, vs2.id, None) == {two[1]}
    time.sleep(0.3)
    assert search_ids(c, vs2.id, None) == {two[1]} and wait_store(c, vs2.id).file_counts.total == 1
    # Deleting the file itself leaves the chunks a store made of it (as OpenAI's stores do).
    assert c.files.delete(two[1]).deleted
    assert search_ids(c, vs2.id, None) == {two[1]}
    # A deleted store is gone, and so are its chunks.
    assert c.vector_stores.delete(vs2.id).deleted
    for call in (lambda: c.vector_stores.search(vs2.id, query="x"), lambda: c.vector_stores.retrieve(vs2.id),
                 lambda: c.vector_stores.files.list(vs2.id), lambda: c.vector_stores.delete(vs2.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert vs2.id not in {v.id for v in c.vector_stores.list(limit=100)}


def test_cancelling_a_batch(c):
    small = upload(c, "small.txt", words(700, 20)).id
    big = upload(c, "big.txt", words(701, 12000)).id
    vs = c.vector_stores.create(name="cancel", file_ids=[small])
    wait_store(c, vs.id)
    b = c.vector_stores.file_batches.create(vs.id, file_ids=[big], chunking_strategy=STATIC)
    assert b.status == "in_progress"
    wait_chunks(c, vs.id)
    b = c.vector_stores.file_batches.cancel(b.id, vector_store_id=vs.id)
    assert b.status == "cancelled" and (b.file_counts.cancelled, b.file_counts.in_progress) == (1, 0)
    assert c.vector_stores.files.retrieve(file_id=big, vector_store_id=vs.id).status == "cancelled"
    assert search_ids(c, vs.id, None) == {small}  # (its chunks went with it)
    counts = c.vector_stores.retrieve(vs.id).file_counts
    assert (counts.completed, counts.cancelled, counts.total) == (1, 1, 2)


# -- 6. the file_search tool ---------------------------------------------------------------------------------
def fs_tool(vs_id: str, k: int = 3, **kw) -> list[dict]:
    return [{"type": "file_search", "vector_store_ids": [vs_id], "max_num_results": k, **kw}]


def documents(results) -> list[dict]:
    return [{"title": r.filename, "text": r.text} for r in results]


def test_file_search_as_documents_matches_transformers(c, kb, names, gen_ref):
    """A RAG template gets the excerpts as its documents, best first: the prompt and the greedy
    answer are transformers' for that conversation with those documents."""
    ids, greedy = gen_ref
    vs, q = kb["vs"], "apple river stone"
    r = c.responses.create(model=names["gen_docs"], input=q, tools=fs_tool(vs.id), max_output_tokens=8, temperature=0,
                           include=["file_search_call.results"])
    assert [o.type for o in r.output] == ["file_search_call", "message"]
    call = r.output[0]
    assert call.status == "completed" and call.queries == [q] and call.id.startswith("fs_")
    found = c.vector_stores.search(vs.id, query=q, max_num_results=3)
    assert [(x.file_id, x.text) for x in call.results] == [(x.file_id, x.content[0].text) for x in found.data]
    assert [x.score for x in call.results] == pytest.approx([x.score for x in found.data], abs=1e-6)
    assert [x.filename for x in call.results] == [x.filename for x in found.data]
    prompt = ids([{"role": "user", "content": q}], documents(call.results))
    assert r.usage.input_tokens == len(prompt)
    assert r.output_text == greedy(prompt, 8)
    # Without include, no results; the same answer.
    plain = c.responses.create(model=names["gen_docs"], input=q, tools=fs_tool(vs.id), max_output_tokens=8,
                               temperature=0)
    assert plain.output[0].type == "file_search_call" and plain.output[0].results is None
    assert plain.output_text == r.output_text and plain.usage.input_tokens == r.usage.input_tokens
    # Nothing found: no documents, the prompt without the tool's.
    r = c.responses.create(model=names["gen_docs"], input=q, max_output_tokens=1, include=["file_search_call.results"],
                           tools=fs_tool(vs.id, 5, filters={"type": "eq", "key": "nope", "value": 1}))
    assert r.output[0].results == [] and r.usage.input_tokens == len(ids([{"role": "user", "content": q}], None))
    # Two stores: the best over both (one holds a file of the other: its chunks come twice).
    only = kb["files"]["doc1.txt"].id
    vs2 = c.vector_stores.create(name="one", file_ids=[only], chunking_strategy=STATIC)
    wait_store(c, vs2.id)
    r = c.responses.create(model=names["gen_docs"], input=q, max_output_tokens=1, include=["file_search_call.results"],
                           tools=[{"type": "file_search", "vector_store_ids": [vs.id, vs2.id], "max_num_results": 50}])
    texts = sorted(x.text for x in r.output[0].results)
    assert texts == sorted([t for _, t in all_chunks(kb)] + kb["chunks"][only])
    scores = [x.score for x in r.output[0].results]
    assert scores == sorted(scores, reverse=True)


def test_file_search_filters(c, tagged, names):
    vs, ids, attrs = tagged["vs"], tagged["ids"], tagged["attrs"]
    for f in FILTERS[:3] + FILTERS[-2:]:
        r = c.responses.create(model=names["gen"], input="apple", max_output_tokens=1,
                               include=["file_search_call.results"], tools=fs_tool(vs.id, 50, filters=f))
        assert {x.file_id for x in r.output[0].results} == {i for i, a in zip(ids, attrs) if matches(f, a)}, f
        assert all(x.attributes == attrs[ids.index(x.file_id)] for x in r.output[0].results)


def test_file_search_in_the_user_message(c, kb, names, emb_tok):
    """A plain template: the excerpts join the last user message, so the prompt grows by about
    their tokens."""
    vs, q = kb["vs"], "hello world"
    base = c.responses.create(model=names["gen"], input=q, max_output_tokens=2, temperature=0)
    r = c.responses.create(model=names["gen"], input=q, tools=fs_tool(vs.id), max_output_tokens=2, temperature=0,
                           include=["file_search_call.results"])
    assert [o.type for o in r.output] == ["file_search_call", "message"] and len(r.output[0].results) == 3
    grew = r.usage.input_tokens - base.usage.input_tokens
    excerpts = sum(len(emb_tok.encode(x.text, add_special_tokens=False)) for x in r.output[0].results)
    assert excerpts - 6 <= grew <= excerpts + 150, (grew, excerpts)  # (and some words around them)
    none = c.responses.create(model=names["gen"], input=q, tools=fs_tool(vs.id), tool_choice="none",
                              max_output_tokens=2, temperature=0)
    assert [o.type for o in none.output] == ["message"]
    assert none.usage.input_tokens == base.usage.input_tokens and none.output_text == base.output_text


def test_file_search_streamed(c, kb, names):
    vs, q = kb["vs"], "quick brown fox"
    unstreamed = c.responses.create(model=names["gen_docs"], input=q, tools=fs_tool(vs.id), max_output_tokens=6,
                                    temperature=0)
    for include in ([], ["file_search_call.results"]):
        events = list(c.responses.create(model=names["gen_docs"], input=q, tools=fs_tool(vs.id), max_output_tokens=6,
                                         temperature=0, include=include, stream=True))
        types = [e.type for e in events]
        at = types.index("response.output_item.added")
        assert types[:2] == ["response.created", "response.in_progress"]
        assert types[at:at + 5] == ["response.output_item.added", "response.file_search_call.in_progress",
                                    "response.file_search_call.searching", "response.file_search_call.completed",
                                    "response.output_item.done"]
        added, done = events[at], events[at + 4]
        assert added.item.type == "file_search_call" and added.output_index == 0
        assert all(e.output_index == 0 and e.item_id == added.item.id for e in events[at + 1:at + 4])
        assert done.item.id == added.item.id and done.item.status == "completed" and done.item.queries == [q]
        assert events[at + 5].type == "response.output_item.added" and events[at + 5].item.type == "message"
        assert events[at + 5].output_index == 1
        final = events[-1].response
        assert types[-1] in ("response.completed", "response.incomplete")
        assert [o.type for o in final.output] == ["file_search_call", "message"]
        assert final.output_text == unstreamed.output_text
        assert final.usage.input_tokens == unstreamed.usage.input_tokens
        results = final.output[0].results
        if include:
            assert [x.file_id for x in results] == [x.file_id for x in done.item.results] and len(results) == 3
        else:
            assert results is None and done.item.results is None


def test_file_search_drops_excerpts_to_fit(c, kb, names, gen_ref):
    """Ten excerpts of about 100 tokens do not fit a 512-token context with room to answer: the
    worst go until they do (room: max_output_tokens, else min(512, max_model_len // 4))."""
    ids, greedy = gen_ref
    vs, q = kb["vs"], "silver mountain"
    msgs = [{"role": "user", "content": q}]
    for max_out, room in ((None, min(512, MAX_LEN // 4)), (8, 8), (300, 300)):
        kw = {"max_output_tokens": max_out} if max_out is not None else {}
        r = c.responses.create(model=names["gen_docs"], input=q, tools=fs_tool(vs.id, 10), temperature=0,
                               include=["file_search_call.results"], **kw)
        assert r.status in ("completed", "incomplete") and r.output[-1].type == "message"
        results = r.output[0].results
        assert len(results) == 10
        n = max(i for i in range(11) if i == 0 or len(ids(msgs, documents(results[:i]))) + room <= MAX_LEN)
        assert n < 10
        prompt = ids(msgs, documents(results[:n]))
        assert r.usage.input_tokens == len(prompt), (max_out, n)
        if max_out == 8:
            assert n > 0 and r.output_text == greedy(prompt, 8)
        if max_out == 300:
            assert n <= 1


def test_file_search_errors(c, kb, names):
    vs = kb["vs"]
    for stream in (False, True):  # (a stream too: refused before it starts)
        with pytest.raises(openai.NotFoundError) as e:
            c.responses.create(model=names["gen"], input="x", stream=stream,
                               tools=[{"type": "file_search", "vector_store_ids": [vs.id, "vs_nope"]}])
        assert e.value.body["param"] == "tools[0].vector_store_ids" and "vs_nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=names["gen"], input="x", tools=fs_tool(vs.id, filters={"type": "eq", "key": "a"}))
    assert e.value.body["param"] == "tools[0].filters"
    for tool, param in (({"vector_store_ids": []}, "tools[0].vector_store_ids"),
                        ({"vector_store_ids": [vs.id], "max_num_results": 51}, "tools[0].max_num_results")):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model=names["gen"], input="x", tools=[{"type": "file_search", **tool}])
        assert e.value.body["param"] == param


def test_file_search_continues_a_conversation(c, kb, names, gen_ref):
    """previous_response_id: the earlier turn is replayed without its excerpts; this turn's search
    is for its own message."""
    ids, greedy = gen_ref
    vs = kb["vs"]
    first = c.responses.create(model=names["gen_docs"], input="apple river", tools=fs_tool(vs.id), max_output_tokens=4,
                               temperature=0)
    second = c.responses.create(model=names["gen_docs"], input="stone cloud", previous_response_id=first.id,
                                tools=fs_tool(vs.id), max_output_tokens=4, temperature=0,
                                include=["file_search_call.results"])
    assert [o.type for o in second.output] == ["file_search_call", "message"]
    assert second.output[0].queries == ["stone cloud"]
    msgs = [{"role": "user", "content": "apple river"}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "stone cloud"}]
    prompt = ids(msgs, documents(second.output[0].results))
    assert second.usage.input_tokens == len(prompt)
    assert second.output_text == greedy(prompt, 4)
    # The output items may go back in as input (the search is not run again for them).
    third = c.responses.create(model=names["gen_docs"], max_output_tokens=2, temperature=0,
                               input=[o.model_dump(exclude_none=True) for o in first.output]
                               + [{"role": "user", "content": "more"}])
    assert third.status in ("completed", "incomplete") and [o.type for o in third.output] == ["message"]


# -- 8. a folder store and tenants --------------------------------------------------------------------------
def test_folder_store_survives_a_restart_and_tenants_see_their_own(servers, dirs, names):
    srv = servers["persist"]
    a, b = api(srv, KEYS["a"]), api(srv, KEYS["b"])
    text = words(600, 80)
    f = upload(a, "mine.txt", text)
    vs = a.vector_stores.create(name="kept", file_ids=[f.id], chunking_strategy=STATIC)
    wait_store(a, vs.id)
    before = a.vector_stores.search(vs.id, query="ocean forest", max_num_results=3)
    assert len(before.data) == 3
    # Another tenant sees none of it.
    assert list(b.files.list()) == [] and list(b.vector_stores.list()) == []
    for call in (lambda: b.files.retrieve(f.id), lambda: b.files.content(f.id), lambda: b.files.delete(f.id),
                 lambda: b.vector_stores.retrieve(vs.id), lambda: b.vector_stores.search(vs.id, query="x"),
                 lambda: b.vector_stores.delete(vs.id),
                 lambda: b.responses.create(model=names["gen"], input="x", tools=fs_tool(vs.id)),
                 lambda: b.vector_stores.create(name="x", file_ids=[f.id])):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.AuthenticationError):
        api(srv, "wrong").files.list()
    mine = a.responses.create(model=names["gen"], input="ocean forest", tools=fs_tool(vs.id), max_output_tokens=1,
                              include=["file_search_call.results"])
    assert [x.text for x in mine.output[0].results] == [x.content[0].text for x in before.data]
    # A file still being embedded when the server stops (some of its chunks in) is not left
    # in_progress, and is not half searchable.
    big = upload(a, "big.txt", words(601, 12000))
    a.vector_stores.files.create(vector_store_id=vs.id, file_id=big.id, chunking_strategy=STATIC,
                                 attributes={"big": True})
    wait_chunks(a, vs.id)
    assert a.vector_stores.files.retrieve(file_id=big.id, vector_store_id=vs.id).status == "in_progress"
    assert srv.stop() == 0
    log = str(dirs["root"] / "persist2.log")
    srv = servers["persist"] = ServerProcess(None, *servers["persist_args"], log_path=log)
    a, b = api(srv, KEYS["a"]), api(srv, KEYS["b"])
    assert {x.id for x in a.files.list()} == {f.id, big.id}
    assert a.files.content(f.id).content == text.encode()
    got = a.vector_stores.retrieve(vs.id)
    assert got.name == "kept" and got.status == "completed" and got.file_counts.completed == 1
    assert a.vector_stores.files.retrieve(file_id=big.id, vector_store_id=vs.id).status in ("failed", "cancelled")
    after = a.vector_stores.search(vs.id, query="ocean forest", max_num_results=3,
                                   filters={"type": "ne", "key": "big", "value": True})
    assert [(x.file_id, x.content[0].text) for x in after.data] == [(x.file_id, x.content[0].text)
                                                                    for x in before.data]
    assert [x.score for x in after.data] == pytest.approx([x.score for x in before.data], abs=1e-6)
    assert list(b.files.list()) == [] and list(b.vector_stores.list()) == []
    found = {x.file_id for x in a.vector_stores.search(vs.id, query="apple", max_num_results=50).data}
    assert found == {f.id}, "the interrupted file's chunks are searchable"


# -- 9. tokenmill/rag alone ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, where, message", [
    ("auto", "chunking_strategy", "chunking_strategy: must be an object"),
    ({"type": "semantic"}, "chunking_strategy", "chunking_strategy.type: must be 'auto' or 'static'"),
    ({"type": "static"}, "chunking_strategy", "chunking_strategy.static: is required"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}}, "chunking_strategy",
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0}}, "chunking_strategy",
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": "200", "chunk_overlap_tokens": 0}}, "chunking_strategy",
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": True, "chunk_overlap_tokens": 0}}, "chunking_strategy",
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}}, "files[2].cs",
     "files[2].cs.static.chunk_overlap_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": -1}}, "chunking_strategy",
     "chunking_strategy.static.chunk_overlap_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200}}, "chunking_strategy",
     "chunking_strategy.static.chunk_overlap_tokens"),
])
def test_chunking_strategy_is_validated(strategy, where, message):
    with pytest.raises(ValueError) as e:
        Chunking.from_request(strategy, where)
    assert str(e.value).startswith(message), str(e.value)


def test_chunking_strategies():
    assert Chunking.from_request(None) == Chunking.from_request({"type": "auto"}) == Chunking(800, 400)
    s = Chunking.from_request({"type": "static", "static": {"max_chunk_size_tokens": 4096,
                                                            "chunk_overlap_tokens": 2048}})
    assert (s.max_tokens, s.overlap_tokens) == (4096, 2048)
    assert Chunking(100, 0).as_object() == {"type": "static", "static": {"max_chunk_size_tokens": 100,
                                                                         "chunk_overlap_tokens": 0}}
    # For an embedding model that reads fewer tokens: auto shrinks to fit, a static size is refused.
    assert Chunking().fitted(300) == Chunking(300, 150) and Chunking().fitted(1000) == Chunking()
    assert Chunking(200, 20).fitted(300) == Chunking(200, 20)
    with pytest.raises(ValueError, match="max_chunk_size_tokens: the embedding model reads at most 300"):
        Chunking(400, 20).fitted(300)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("tok"))
    save_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def test_chunk_text_windows(tokenizer):
    text = ("Café crème brûlée, naïve façade. 日本語のテキスト、中文文本。 Emoji: 😀 🚀 ✨ and math: ∑ ∫ √. "
            + words(7, 60) + "\n\n" + words(8, 40))
    offsets = [o for o in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
               if o[1] > o[0]]
    n = len(offsets)
    assert n > 300
    for size, overlap in ((100, 20), (100, 0), (128, 64), (4096, 100)):
        chunks = chunk_text(tokenizer, text, Chunking(size, overlap))
        starts = [0]
        while starts[-1] + size < n:  # (windows of size tokens, size - overlap apart, until one reaches the end)
            starts.append(starts[-1] + size - overlap)
        want = [text[offsets[s][0]:offsets[min(s + size, n) - 1][1]] for s in starts]
        assert chunks == want, (size, overlap)
        assert text.startswith(chunks[0]) and text.endswith(chunks[-1])
    one = "Hello world!"
    assert chunk_text(tokenizer, one, Chunking(100, 20)) == [one]
    assert chunk_text(tokenizer, "", Chunking(100, 20)) == []
    assert chunk_text(tokenizer, "   \n ", Chunking(100, 20)) == []
    # exactly one window, and one token more
    ids = tokenizer(words(9, 200), add_special_tokens=False, return_offsets_mapping=True)
    cut = ids["offset_mapping"][99][1]
    t100 = words(9, 200)[:cut]
    assert len(tokenizer(t100, add_special_tokens=False)["input_ids"]) == 100
    assert chunk_text(tokenizer, t100, Chunking(100, 20)) == [t100]
    t101 = words(9, 200)[:ids["offset_mapping"][100][1]]
    assert len(tokenizer(t101, add_special_tokens=False)["input_ids"]) == 101
    two = chunk_text(tokenizer, t101, Chunking(100, 20))
    assert two[0] == t100 and len(two) == 2 and t101.endswith(two[1])
    assert len(tokenizer(two[1], add_special_tokens=False)["input_ids"]) <= 21


PAYLOADS = [{"lang": "en", "year": 2020, "draft": False, "score": 0.5, "tag": "x"},
            {"lang": "fr", "year": 2023, "score": 2.5, "tag": 7},
            {"lang": "de", "year": 2019, "draft": True, "tag": True},
            {"lang": "en", "score": 7.25, "tag": "7"},
            {"lang": "es", "year": 2021, "batch": "b1", "draft": False},
            {}, {"year": 1999, "score": -3.5, "lang": ""}]


def random_filter(rng: random.Random, depth: int = 0) -> dict:
    if depth < 3 and rng.random() < 0.3:
        return {"type": rng.choice(["and", "or"]),
                "filters": [random_filter(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    key = rng.choice(["lang", "year", "draft", "score", "tag", "batch", "missing"])
    values = ["en", "fr", "es", "", "x", "7", 2019, 2020, 2021, 7, 0, -1, 2.5, 0.5, 7.25, -3.5, 1000.75, True, False]
    kind = rng.choice(["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"])
    if kind in ("in", "nin"):
        return {"type": kind, "key": key, "value": rng.sample(values, rng.randint(1, 4))}
    if kind in ("gt", "gte", "lt", "lte"):
        return {"type": kind, "key": key, "value": rng.choice([v for v in values if type(v) in (int, float)])}
    return {"type": kind, "key": key, "value": rng.choice(values)}


@pytest.fixture(scope="module")
def qdrant():
    from qdrant_client import QdrantClient, models

    client = QdrantClient(location=":memory:")

    def load(payloads: list[dict]) -> str:
        name = f"c{random.getrandbits(32)}"
        client.create_collection(name, vectors_config={})
        client.upsert(name, points=[models.PointStruct(id=i, vector={}, payload={"attributes": p})
                                    for i, p in enumerate(payloads)])
        return name

    def found(name: str, f: dict) -> set[int]:
        points, _ = client.scroll(name, scroll_filter=to_qdrant(f), limit=1000)
        return {p.id for p in points}

    yield load, found
    client.close()


def test_filters_against_brute_force(qdrant):
    load, found = qdrant
    name = load(PAYLOADS)
    rng = random.Random(0)
    tried = [*FILTERS, *(random_filter(rng) for _ in range(400))]
    hits = 0
    for f in tried:
        want = {i for i, p in enumerate(PAYLOADS) if matches(f, p)}
        assert found(name, f) == want, f
        hits += 0 < len(want) < len(PAYLOADS)
    assert hits > 80  # (many filters split the points)


def test_filters_on_integral_floats(qdrant):
    """An attribute 3.0 (JSON's 3.0 parses as a float) is the number 3 to eq, ne, in and nin."""
    load, found = qdrant
    payloads = [{"n": 3.0}, {"n": 3}, {"n": 3.5}, {"n": "3"}, {}]
    name = load(payloads)
    for f in ({"type": "eq", "key": "n", "value": 3}, {"type": "eq", "key": "n", "value": 3.0},
              {"type": "ne", "key": "n", "value": 3}, {"type": "in", "key": "n", "value": [3.0, 9]},
              {"type": "nin", "key": "n", "value": [3]}, {"type": "gte", "key": "n", "value": 3}):
        assert found(name, f) == {i for i, p in enumerate(payloads) if matches(f, p)}, f


def nested(k: int) -> dict:
    f: dict = {"type": "eq", "key": "a", "value": 1}
    for _ in range(k):
        f = {"type": "and", "filters": [f]}
    return f


@pytest.mark.parametrize("f, message", [
    ("eq", "filters: must be an object"),
    ({"key": "a", "value": 1}, "filters.type: must be one of"),
    ({"type": "like", "key": "a", "value": 1}, "filters.type: must be one of"),
    ({"type": "eq", "value": 1}, "filters.key"),
    ({"type": "eq", "key": "", "value": 1}, "filters.key"),
    ({"type": "eq", "key": "a"}, "filters.value"),
    ({"type": "eq", "key": "a", "value": None}, "filters.value"),
    ({"type": "eq", "key": "a", "value": [1]}, "filters.value"),
    ({"type": "eq", "key": "a", "value": {"b": 1}}, "filters.value"),
    ({"type": "in", "key": "a", "value": []}, "filters.value"),
    ({"type": "in", "key": "a", "value": "abc"}, "filters.value"),
    ({"type": "nin", "key": "a", "value": [1, [2]]}, "filters.value"),
    ({"type": "gt", "key": "a", "value": "2020"}, "filters.value"),
    ({"type": "lte", "key": "a", "value": True}, "filters.value"),
    ({"type": "and", "filters": []}, "filters.filters"),
    ({"type": "or"}, "filters.filters"),
    ({"type": "or", "filters": {"type": "eq", "key": "a", "value": 1}}, "filters.filters"),
    ({"type": "or", "filters": [{"type": "eq", "key": "a", "value": 1}, {"type": "eq", "key": "a"}]},
     "filters.filters[1].value"),
    ({"type": "and", "filters": [{"type": "or", "filters": [{"type": "gt", "key": "a", "value": "x"}]}]},
     "filters.filters[0].filters[0].value"),
    (nested(MAX_DEPTH + 1), "filters.filters[0]"),
])
def test_malformed_filters_name_where(f, message):
    with pytest.raises(ValueError) as e:
        to_qdrant(f)
    assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ValueError) as e:
        to_qdrant(f, "tools[0].filters")
    assert str(e.value).startswith("tools[0]." + message), str(e.value)


def test_filters_nest_to_the_limit(qdrant):
    load, found = qdrant
    name = load([{"a": 1}, {"a": 2}])
    assert found(name, nested(MAX_DEPTH)) == {0}
    with pytest.raises(ValueError, match=f"nest at most {MAX_DEPTH} deep"):
        to_qdrant(nested(MAX_DEPTH + 1))


# -- a reranker, sentence-transformers prompts, file_search in chat, LangChain --------------------------
QUERY_PROMPT, DOC_PROMPT = "Instruct: find the passage\nQuery: ", "passage: "


@pytest.fixture(scope="module")
def rr_server(dirs):
    """An embedding model whose sentence-transformers config names query and document prompts,
    and a reranker (a one-label classifier) that --rag-reranker puts after every search."""
    import json
    import shutil

    from tests.test_scoring import make_classifier

    d = dirs["root"]
    emb = str(d / "emb_prompts")
    shutil.copytree(dirs["emb"], emb)
    with open(os.path.join(emb, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": {"query": QUERY_PROMPT, "document": DOC_PROMPT}, "default_prompt_name": None}, f)
    rr = make_classifier(str(d / "rr"), "llama", ["LABEL_0"])
    srv = ServerProcess(None, "--model", dirs["gen"], "--model", emb, "--model", rr, "--rag-reranker", "rr",
                        "--kv-cache-memory", "0.0625", "--max-model-len", str(MAX_LEN), log_path=str(d / "rr.log"))
    yield srv
    assert srv.stop() == 0


def test_reranker_and_embedding_prompts(rr_server, embed):
    """Chunks and queries are embedded after the model's prompts (ranker "none": transformers'
    cosine of the prompted texts); by default the reranker reorders the nearest chunks, and its
    relevance (what /rerank says of the pair) is the score that score_threshold applies to."""
    import httpx

    c = api(rr_server)
    files = [upload(c, f"d{i}.txt", words(40 + i, 70)) for i in range(2)]
    vs = c.vector_stores.create(name="rr", file_ids=[f.id for f in files], chunking_strategy=STATIC)
    assert (vs.model_extra["query_prompt"], vs.model_extra["document_prompt"]) == (QUERY_PROMPT, DOC_PROMPT)
    wait_store(c, vs.id)
    chunks = [(f.id, x.text) for f in files for x in c.vector_stores.files.content(file_id=f.id, vector_store_id=vs.id)]
    assert len(chunks) < 20  # (so every chunk is a candidate of the reranker: rerank_pool(3) = 20)
    q = "silver planet music"
    got = c.vector_stores.search(vs.id, query=q, max_num_results=3, ranking_options={"ranker": "none"})
    sims = (embed([QUERY_PROMPT + q]) @ embed([DOC_PROMPT + t for _, t in chunks]).T)[0]
    best = sorted(range(len(chunks)), key=lambda i: -float(sims[i]))[:3]
    assert [(x.file_id, x.content[0].text) for x in got.data] == [chunks[i] for i in best]
    assert [x.score for x in got.data] == pytest.approx([float(sims[i]) for i in best], abs=1e-4)
    # The reranker's order, over every chunk: /rerank's.
    ranked = httpx.post(rr_server.base_url + "/rerank", timeout=60,
                        json={"model": "rr", "query": q, "documents": [t for _, t in chunks]}).json()["results"]
    got = c.vector_stores.search(vs.id, query=q, max_num_results=3)
    assert [(x.file_id, x.content[0].text) for x in got.data] == [chunks[r["index"]] for r in ranked[:3]]
    assert [x.score for x in got.data] == pytest.approx([r["relevance_score"] for r in ranked[:3]], abs=1e-5)
    cut = (ranked[1]["relevance_score"] + ranked[2]["relevance_score"]) / 2
    got = c.vector_stores.search(vs.id, query=q, max_num_results=3, ranking_options={"score_threshold": cut})
    assert [x.content[0].text for x in got.data] == [chunks[r["index"]][1] for r in ranked[:2]]
    with pytest.raises(openai.BadRequestError) as e:
        c.vector_stores.search(vs.id, query=q, ranking_options={"ranker": "best"})
    assert "ranker" in e.value.body["param"]


def excerpted(message: str, results: list) -> str:
    """The user's message with the excerpts before it, as tokenmill writes it."""
    from tokenmill.server.file_search import FileSearch

    fs = FileSearch(None, None, False, lambda p, m: ValueError(m))
    fs.results = [{"filename": r["filename"], "text": r["text"]} for r in results]
    return fs.with_excerpts(message, len(results))


def test_file_search_in_chat_completions(c, servers, kb, names):
    """The same tool in chat's tools: the search comes back as the answer's file_search_call, and
    the prompt is exactly the conversation with the excerpts before the user's message."""
    import httpx

    vs, q = kb["vs"], "orange planet table"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
    r = c.chat.completions.create(model=names["gen"], messages=msgs, tools=fs_tool(vs.id), max_tokens=4,
                                  temperature=0)
    call = r.model_extra["file_search_call"]
    assert call["type"] == "file_search_call" and call["queries"] == [q] and len(call["results"]) == 3
    found = c.vector_stores.search(vs.id, query=q, max_num_results=3)
    assert [x["text"] for x in call["results"]] == [x.content[0].text for x in found.data]
    same = msgs[:1] + [{"role": "user", "content": excerpted(q, call["results"])}]
    plain = c.chat.completions.create(model=names["gen"], messages=same, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert r.choices[0].message.content == plain.choices[0].message.content
    counted = httpx.post(servers["main"].base_url + "/tokenize", json={"model": names["gen"], "messages": same})
    assert counted.json()["count"] == r.usage.prompt_tokens
    # Streamed: the first chunk carries the search, the text is the same.
    chunks = list(c.chat.completions.create(model=names["gen"], messages=msgs, tools=fs_tool(vs.id), max_tokens=4,
                                            temperature=0, stream=True))
    assert chunks[0].model_extra["file_search_call"]["queries"] == [q]
    assert all("file_search_call" not in (x.model_extra or {}) for x in chunks[1:])
    assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == r.choices[0].message.content
    # tool_choice "none": no search, the plain prompt.
    none = c.chat.completions.create(model=names["gen"], messages=msgs, tools=fs_tool(vs.id), tool_choice="none",
                                     max_tokens=4, temperature=0)
    base = c.chat.completions.create(model=names["gen"], messages=msgs, max_tokens=4, temperature=0)
    assert "file_search_call" not in (none.model_extra or {})
    assert none.usage.prompt_tokens == base.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model=names["gen"], messages=msgs, tools=fs_tool("vs_nope"), max_tokens=1)
    assert e.value.body["param"] == "tools[0].vector_store_ids"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=names["gen"], messages=msgs, tools=fs_tool(vs.id), max_tokens=1,
                                  tool_choice={"type": "function", "function": {"name": "f"}})
    assert e.value.body["param"] == "tool_choice" and "file_search" in e.value.body["message"]
    # The retrieval's own embedding requests (one per chunk of every file) stay out of the INFO log.
    assert "request rag-" not in servers["main"].log() and "request chatcmpl-" in servers["main"].log()
    # Through Ollama's /api/chat (a translation to this route): a missing store is not a missing model.
    r = httpx.post(servers["main"].base_url + "/api/chat", timeout=60, json={
        "model": names["gen"], "stream": False, "messages": msgs, "tools": fs_tool("vs_nope")})
    assert r.status_code == 404 and "vs_nope" in r.json()["error"], r.text


def test_langchain_file_search(servers, kb, names):
    """LangChain's ChatOpenAI with a file_search tool (it calls the Responses API for it): the
    search and the answer the openai client gets."""
    langchain_openai = pytest.importorskip("langchain_openai") if not os.environ.get("CI") else __import__(
        "langchain_openai")
    vs, q = kb["vs"], "lazy dog garden"
    llm = langchain_openai.ChatOpenAI(model=names["gen"], base_url=servers["main"].base_url + "/v1", api_key="x",
                                      max_tokens=4, temperature=0)
    msg = llm.bind_tools(fs_tool(vs.id)).invoke(q)
    blocks = msg.content
    assert blocks[0]["type"] == "file_search_call" and blocks[0]["queries"] == [q]
    ref = api(servers["main"]).responses.create(model=names["gen"], input=q, tools=fs_tool(vs.id),
                                                max_output_tokens=4, temperature=0)
    assert "".join(b.get("text", "") for b in blocks if b["type"] == "text") == ref.output_text
    assert msg.usage_metadata["input_tokens"] == ref.usage.input_tokens


def test_a_tenant_uses_only_its_models_and_limits(servers, dirs, names):
    """A tenant kept to the generative model has no embedding model for a store (the one served is
    not its to use), and a search counts against its requests per minute."""
    srv = servers["persist"]
    c = api(srv, "key-genonly")
    with pytest.raises(openai.BadRequestError) as e:
        c.vector_stores.create(name="x")
    assert e.value.body["code"] == "no_embedding_model"
    with pytest.raises(openai.NotFoundError):
        c.vector_stores.create(name="x", extra_body={"embedding_model": names["emb"]})
    assert list(c.vector_stores.list()) == []


def test_non_finite_attributes_and_filters_are_refused(c, servers, kb):
    """NaN has no JSON: stored, it would break every answer that shows it (Python's json sends it)."""
    import httpx

    vs, f, base = kb["vs"], kb["files"]["doc0.txt"], servers["main"].base_url + "/v1/vector_stores/"
    for bad in ("NaN", "Infinity", "-Infinity"):
        for path, raw in ((f"{vs.id}/files/{f.id}", f'{{"attributes": {{"x": {bad}}}}}'),
                          (f"{vs.id}/files", f'{{"file_id": "{f.id}", "attributes": {{"x": {bad}}}}}'),
                          (f"{vs.id}/search",
                           f'{{"query": "x", "filters": {{"type": "gt", "key": "x", "value": {bad}}}}}')):
            r = httpx.post(base + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
            assert r.status_code == 400, (path, raw, r.text[:300])
            assert ("filters" if path.endswith("search") else "attributes") in r.json()["error"]["param"]
    assert c.vector_stores.files.retrieve(file_id=f.id, vector_store_id=vs.id).attributes == {}
    assert len(c.vector_stores.search(vs.id, query="apple").data) > 0  # (the store still answers)


def test_uploads_are_bounded_as_they_arrive(servers):
    """--max-body-size bounds a file whether its body has a length or is sent in chunks."""
    import httpx

    base, limit = servers["bare"].base_url, 8 * 2**20
    boundary = "tmbound"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}

    def chunks(n: int):
        yield head
        for _ in range(n):
            yield b"x" * 2**20
        yield tail

    r = httpx.post(base + "/v1/files", content=chunks(9), headers=headers, timeout=60)  # (no length: chunked)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    r = httpx.post(base + "/v1/files", content=b"".join(chunks(9)), headers=headers, timeout=60)
    assert r.status_code == 413
    r = httpx.post(base + "/v1/files", content=chunks(1), headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["bytes"] == 2**20, r.text[:300]
    assert limit > 2**20


def test_file_search_keeps_a_store_active(c, kb, names):
    """A store that expires after inactivity is in use when file_search reads it."""
    f = kb["files"]["doc2.txt"]
    vs = c.vector_stores.create(name="exp", file_ids=[f.id], chunking_strategy=STATIC,
                                expires_after={"anchor": "last_active_at", "days": 1})
    wait_store(c, vs.id)
    before = c.vector_stores.retrieve(vs.id)
    time.sleep(1.1)
    c.responses.create(model=names["gen"], input="x", tools=fs_tool(vs.id), max_output_tokens=1)
    after = c.vector_stores.retrieve(vs.id)
    assert after.last_active_at > before.last_active_at and after.expires_at == after.last_active_at + 86400


def test_a_search_runs_as_its_tenants_request(servers, names):
    """The query's embedding is the tenant's work (its metrics, its prefix-cache namespace)."""
    srv = servers["persist"]
    a = api(srv, KEYS["a"])
    f = upload(a, "t.txt", words(700, 80))
    vs = a.vector_stores.create(name="t", file_ids=[f.id], chunking_strategy=STATIC)
    wait_store(a, vs.id)

    def prompt_tokens(tenant: str) -> float:
        key = f'tokenmill:prompt_tokens_total{{model_name="{names["emb"]}",tenant="{tenant}"}}'
        return srv.metrics().get(key, 0.0)

    before = prompt_tokens("a"), prompt_tokens("default")
    a.vector_stores.search(vs.id, query="silver river stone")
    assert prompt_tokens("a") > before[0] and prompt_tokens("default") == before[1]
