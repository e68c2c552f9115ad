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


def test_stop_string_before_a_partial_character_ends_at_that_token(tok):
    """A token holding a whole character and the start of another ("Ġâ": a space, then the first
    byte of ✓): the text waits for the rest of ✓, but a stop string its space completes ends the
    text at that token, not at a later one (or, at the end of generation, never)."""
    ids = _gpt2_ids(tok, "code") + [tok.convert_tokens_to_ids("Ġâ")] + _gpt2_ids(tok, "✓")[1:]
    assert tok.decode(ids) == "code ✓"
    d = IncrementalDetokenizer(tok, [5, 6], True, ["de "])
    hits = [d.add_token(t) for t in ids[:5]]
    assert hits == [None] * 4 + ["de "] and d.text == "co"
    d = IncrementalDetokenizer(tok, [5, 6], True, ["de "])  # stop checks off until the end: flush() finds it
    for t in ids[:5]:
        assert d.add_token(t, check_stop=False) is None
    assert d.flush() == "de " and d.text == "co"
    d = IncrementalDetokenizer(tok, [5, 6], True, ["xyz"])
    assert [d.add_token(t) for t in ids] == [None] * 7 and d.text == "code ✓"  # no stop: nothing taken back


def test_an_abort_or_min_tokens_keeps_the_end_of_generation_from_taking_a_stop(tok, llm):
    """flush() at the end checks stop strings only where add_token would have: not for an aborted
    request, and not before min_tokens ("co", then "aÃ": "a" and the first byte of a character, held back)."""
    from tokenmill import SamplingParams

    eng = llm.engine
    resume = _gpt2_ids(tok, "co") + [tok.convert_tokens_to_ids("aÃ")]
    sp = SamplingParams(max_tokens=20, min_tokens=10, stop=["coa"], temperature=0)
    rid = eng.add_request({"prompt_token_ids": [5, 6, 7], "resume_token_ids": resume}, sp)
    c = eng.abort_request(rid).outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("abort", None) and c.text.startswith("coa")


def test_earliest_stop_wins(tok):
    ids = _gpt2_ids(tok, "xx one two")
    d, _, hit = _run(tok, ids, stop=["two", "one"])
    assert hit == "one" and d.text == "xx "


def test_decoding_once_at_the_end_gives_the_incremental_text(tok, model_dir):
    """FinalDetokenizer (final-only requests without stop strings) decodes once; its text is the
    incremental decode's, across split multi-byte characters, a broken final character and random ids."""
    from tokenmill.engine.detokenizer import FinalDetokenizer

    rng = random.Random(1)
    cases = [_gpt2_ids(tok, TEXT), _gpt2_ids(tok, "ok 😀")[:-1]]
    cases += [[rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 60))] for _ in range(30)]
    for ids in cases:
        prompt = [rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 9))]
        inc = IncrementalDetokenizer(tok, prompt, True, [])
        once = FinalDetokenizer(tok, prompt, True, [])
        for t in ids:
            inc.add_token(t)
            once.add_token(t)
        inc.flush()
        assert once.text == inc.text == tok.decode(ids, skip_special_tokens=True)
    # Through the engine: LLM.generate's final-only requests against a streamed one's text.
    from tokenmill import LLM, SamplingParams

    llm = LLM(model_dir, kv_cache_memory_bytes=4 * 2**20)
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    prompts = ["Café crème", "日本語のテキスト", "Emoji: 😀 🚀"]
    outs = llm.generate(prompts, params)
    eng = llm.engine
    rid = eng.add_request(prompts[0], params, final_only=True)
    assert isinstance(eng.requests[rid].seqs[0].detokenizer, FinalDetokenizer)
    stop = eng.add_request(prompts[0], SamplingParams(max_tokens=4, stop=["x"]), final_only=True)
    assert type(eng.requests[stop].seqs[0].detokenizer) is IncrementalDetokenizer  # stop strings: watched
    eng.abort_request(rid)
    eng.abort_request(stop)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].text == "".join(llm.stream(prompt, params)) != ""


def test_the_text_of_the_first_min_tokens_tokens_does_not_stop_the_output(llm):
    """As vLLM: stop strings are looked for from token min_tokens + 1 on (min_tokens=1 with
    stop=["\\n"] must not give an empty answer); one that begins in those tokens and ends after
    them does stop."""
    from tokenmill import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    base = llm.generate({"prompt_token_ids": [5, 6, 7]}, greedy)[0].outputs[0]
    tok = llm.get_tokenizer()
    first, second = tok.decode(base.token_ids[:1]), tok.decode(base.token_ids[:2])
    stop = first.strip()[:1]
    assert stop and stop not in base.text[len(first):]
    for min_tokens, n in ((0, 1), (1, 8)):
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop], min_tokens=min_tokens)
        out = llm.generate({"prompt_token_ids": [5, 6, 7]}, sp)[0].outputs[0]
        assert len(out.token_ids) == n, (min_tokens, out)
    spanning = first[-1] + second[len(first):][:1]
    assert len(spanning) == 2 and spanning not in first
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[spanning], min_tokens=1)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, sp)[0].outputs[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "stop"


def test_a_stop_string_inside_the_min_tokens_text_does_not_stop_it_later(tok):
    """Each stop string is looked for where it could end in the new text: a short one lying in
    text that was not checked (min_tokens' first tokens) is not found later, because a longer stop
    string widened the search (vLLM: only matches ending in the new text)."""
    d = IncrementalDetokenizer(tok, [5, 6], True, ["here", "The end is"])
    ids = _gpt2_ids(tok, "Stop here.")
    assert [d.add_token(t, check_stop=False) for t in ids[:-1]] == [None] * (len(ids) - 1)
    assert d.add_token(ids[-1]) is None and d.text == "Stop here."
    d = IncrementalDetokenizer(tok, [5, 6], True, ["here", "The end is"])
    assert [d.add_token(t) for t in _gpt2_ids(tok, "Stop he")] == [None] * 7
    assert d.add_token(_gpt2_ids(tok, "r")[0]) is None and d.add_token(_gpt2_ids(tok, "e")[0]) == "here"
