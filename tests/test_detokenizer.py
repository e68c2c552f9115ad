"""Incremental detokenization: multi-byte characters and stop strings across token boundaries."""

import random

import pytest
from transformers import AutoTokenizer

from tokenmill.engine.detokenizer import BYTE_TO_UNICODE, IncrementalDetokenizer

TEXT = "Café crème 日本語 😀🚀 naïve ✨ end"


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _gpt2_ids(tok, text):
    vocab = tok.get_vocab()
    return [vocab[BYTE_TO_UNICODE[b]] for b in text.encode("utf-8")]


def _run(tok, ids, stop=(), prompt=(5, 6)):
    d = IncrementalDetokenizer(tok, list(prompt), True, list(stop))
    deltas = []
    hit = None
    for t in ids:
        hit = d.add_token(t)
        if hit:
            break
        deltas.append(d.delta(False))
    if not hit:
        d.flush()
    deltas.append(d.delta(True))
    return d, deltas, hit


def test_split_multibyte_characters_decode_exactly(tok):
    ids = _gpt2_ids(tok, TEXT)
    assert tok.decode(ids) == TEXT
    d, deltas, _ = _run(tok, ids)
    assert d.text == TEXT
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in x for x in deltas)


def test_mixed_tokens_match_full_decode(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, len(tok)) for _ in range(40)]
        d, deltas, _ = _run(tok, ids)
        assert d.text == tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == d.text


def test_broken_final_character_is_flushed(tok):
    ids = _gpt2_ids(tok, "ok 😀")[:-1]  # last byte of the emoji missing
    d, deltas, _ = _run(tok, ids)
    assert d.text == tok.decode(ids)
    assert "".join(deltas) == d.text


def test_stop_string_across_tokens_is_cut_and_never_streamed(tok):
    text = "abc STOP here"
    ids = _gpt2_ids(tok, text)  # one byte per token: "STOP" spans four tokens
    d, deltas, hit = _run(tok, ids, stop=["STOP"])
    assert hit == "STOP"
    assert d.text == "abc "
    assert "".join(deltas) == "abc "
    assert not any("S" in x for x in deltas)


def test_earliest_stop_wins(tok):
    ids = _gpt2_ids(tok, "xx one two")
    d, _, hit = _run(tok, ids, stop=["two", "one"])
    assert hit == "one" and d.text == "xx "
