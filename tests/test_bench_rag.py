"""`tokenmill bench rag` end to end on a tiny model (the figures are the machine's; what is checked
is that both arms ran the same requests on the same excerpts), and file_search's excerpt order."""

from __future__ import annotations

import json

from tests.models import make_model
from tokenmill.bench.rag import _reordered, format_table, run
from tokenmill.cli import build_parser
from tokenmill.server.file_search import FileSearch


def test_document_order_sorts_the_best_by_where_they_are():
    fs = FileSearch(None, None, False, lambda p, m: ValueError(m))
    fs.results = [{"vector_store_id": "vs_b", "file_id": "f1", "index": 0, "filename": "b", "text": "1"},
                  {"vector_store_id": "vs_a", "file_id": "f2", "index": 3, "filename": "a", "text": "2"},
                  {"vector_store_id": "vs_a", "file_id": "f2", "index": 1, "filename": "a", "text": "3"},
                  {"vector_store_id": "vs_a", "file_id": "f1", "index": 9, "filename": "a", "text": "4"}]
    assert [r["text"] for r in fs.excerpts(3)] == ["1", "2", "3"]  # score order: best first
    fs.order = "document"
    assert [r["text"] for r in fs.excerpts(3)] == ["3", "2", "1"]  # the best 3, in the files' order
    assert [r["text"] for r in fs.excerpts(4)] == ["4", "3", "2", "1"]
    text = fs.with_excerpts("q", 2)  # (the best two: "1" and "2", in the files' order)
    assert text.index("[1] a\n2") < text.index("[2] b\n1") < text.index("Message:\nq")


def test_reordered_counts():
    a, b, c = ("f", "a"), ("f", "b"), ("g", "c")
    got = _reordered([[a, b], [b, a], [a, b], [c], [a, c]])
    assert got == {"requests": 5, "same_set_as_earlier": 2, "same_order_as_earlier": 1}


def test_bench_rag_runs_both_orders(tmp_path):
    model = make_model(str(tmp_path / "m"), "llama")
    args = build_parser().parse_args(["bench", "rag", "--model", model, "--num-docs", "2", "--doc-words", "150",
                                      "--chunk-tokens", "100", "--max-num-results", "2", "--num-topics", "2",
                                      "--num-requests", "6", "--max-concurrency", "2", "--output-len", "2",
                                      "--kv-cache-memory", "0.0625", "--json", str(tmp_path / "r.json")])
    r = run(args)
    assert json.loads((tmp_path / "r.json").read_text())["ratios"] == r["ratios"]
    for arm in ("score", "document"):
        assert r[arm]["prompt_tokens"] > 6 * 100  # (two excerpts of about 100 tokens each, every request)
        assert 0 <= r[arm]["cached_tokens"] <= r[arm]["prompt_tokens"]
    # The same excerpts in another order: the same number of prompt tokens.
    assert r["score"]["prompt_tokens"] == r["document"]["prompt_tokens"]
    assert r["reordered"]["requests"] == 6
    assert "document order" in format_table(r)
