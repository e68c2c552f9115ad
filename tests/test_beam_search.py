"""Beam search: token for token what transformers' generate(num_beams=w) returns, on shared KV.

The parity cases run on tiny random weights with a large init range (peaked distributions) and
a second stop token the model actually writes, so that beams finish at different lengths and
the length penalty and the early-stopping rules decide the result.
"""

from __future__ import annotations

import math
import os
import random

import openai
import pytest
import torch

from tests.models import hf_model, make_model
from tokenmill import LLM, SamplingParams
from tokenmill.engine.beam import BeamSearch


@pytest.fixture(scope="module")
def peaked(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("beam") / "m"), initializer_range=0.3)


@pytest.fixture(scope="module")
def hf(peaked):
    return hf_model(peaked)


def _llm(path: str, blocks: int, block_size: int, **kw) -> LLM:
    # 2 layers x (K, V) x 2 KV heads x 16 dims x 4 bytes per token
    llm = LLM(path, dtype="float32", block_size=block_size, kv_cache_memory_bytes=blocks * block_size * 512, **kw)
    assert llm.engine.block_manager.num_blocks == blocks
    return llm


def _cases(hf, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(3, 40))]
        with torch.no_grad():
            g = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        cases.append(dict(prompt=prompt, width=rng.choice([1, 2, 3, 4, 6]),
                          length_penalty=rng.choice([1.0, 0.0, 2.0, -1.0]),
                          early_stopping=rng.choice([False, True, "never"]), max_tokens=rng.choice([8, 20, 40]),
                          stop=g[rng.randrange(2, 6)]))
    return cases


def _reference(hf, c: dict) -> tuple[list[list[int]], list[float]]:
    p = c["prompt"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=c["max_tokens"], num_beams=c["width"], num_return_sequences=c["width"],
                          do_sample=False, length_penalty=c["length_penalty"], early_stopping=c["early_stopping"],
                          eos_token_id=[2, c["stop"]], pad_token_id=0, return_dict_in_generate=True,
                          output_scores=True)
    seqs = []
    for row in out.sequences[:, len(p):].tolist():
        toks = []
        for t in row:  # shorter beams are padded after their stop token
            toks.append(t)
            if t in (2, c["stop"]):
                break
        seqs.append(toks)
    scores = out.sequences_scores.tolist() if c["width"] > 1 else [None]
    return seqs, scores


def _params(c: dict, **kw) -> SamplingParams:
    return SamplingParams(n=c["width"], use_beam_search=True, max_tokens=c["max_tokens"],
                          length_penalty=c["length_penalty"], early_stopping=c["early_stopping"],
                          stop_token_ids=[c["stop"]], **kw)


def _check(llm: LLM, outs, refs, cases) -> None:
    for o, (ref, scores), c in zip(outs, refs, cases):
        assert [x.token_ids for x in o.outputs] == ref, c
        for x, toks, score in zip(o.outputs, ref, scores):
            assert x.finish_reason == ("stop" if toks[-1] in (2, c["stop"]) else "length")
            if score is not None:  # transformers' sequence score: the sum over length ** penalty
                got = x.cumulative_logprob / len(toks) ** c["length_penalty"]
                assert got == pytest.approx(score, rel=1e-5, abs=1e-5)
    bm = llm.engine.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks  # every beam's blocks came back


def test_equals_transformers_alone_and_batched(peaked, hf):
    """Each request alone, then all at once beside sampled requests: the same beams as transformers."""
    cases = _cases(hf, 14, seed=0)
    refs = [_reference(hf, c) for c in cases]
    llm = LLM(peaked, dtype="float32", kv_cache_memory_bytes=16 * 2**20)
    alone = [llm.generate([{"prompt_token_ids": c["prompt"]}], _params(c))[0] for c in cases]
    _check(llm, alone, refs, cases)
    prompts = [{"prompt_token_ids": c["prompt"]} for c in cases] + ["Hello world", "The quick brown"]
    params = [_params(c) for c in cases] + [SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=30)] * 2
    batched = llm.generate(prompts, params)
    _check(llm, batched[: len(cases)], refs, cases)
    assert all(len(x.token_ids) == 30 or x.finish_reason == "stop" for o in batched[len(cases):] for x in o.outputs)


def test_equals_transformers_under_preemption(peaked, hf):
    """A cache too small for every beam of every request at once: beams are preempted, recomputed
    and re-forked, and the result is still transformers' (and no block leaks)."""
    cases = [c for c in _cases(hf, 30, seed=1) if c["width"] * -(-(len(c["prompt"]) + c["max_tokens"]) // 4) <= 48][:8]
    refs = [_reference(hf, c) for c in cases]
    llm = _llm(peaked, 48, 4, max_num_batched_tokens=64, max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": c["prompt"]} for c in cases], [_params(c) for c in cases])
    assert llm.engine.stats()["num_preemptions"] > 0
    _check(llm, outs, refs, cases)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_equals_transformers_beside_speculative_decoding(peaked, hf, method):
    """Beams take no drafts; a draft model's KV is forked with theirs; greedy requests beside
    them still speculate."""
    cases = _cases(hf, 5, seed=7)
    refs = [_reference(hf, c) for c in cases]
    spec = {"method": method, "num_speculative_tokens": 3, **({"model": peaked} if method == "draft_model" else {})}
    llm = LLM(peaked, dtype="float32", kv_cache_memory_bytes=16 * 2**20, speculative_config=spec)
    outs = llm.generate([{"prompt_token_ids": c["prompt"]} for c in cases] + ["Hello world"],
                        [_params(c) for c in cases] + [SamplingParams(temperature=0, max_tokens=30)])
    _check(llm, outs[: len(cases)], refs, cases)
    assert llm.engine.stats()["spec_decode_num_drafts"] > 0


def test_beams_share_the_prompt_and_fork_blocks(peaked, hf):
    """The prompt is prefilled once for all beams, and forks copy partly filled blocks only."""
    prompt = list(range(3, 3 + 70))
    llm = LLM(peaked, dtype="float32", kv_cache_memory_bytes=16 * 2**20, enable_prefix_caching=False)
    seen = []
    engine = llm.engine
    step = engine.step

    def watch():  # the blocks the request's beams reference, at every step
        out = step()
        for req in engine.requests.values():
            seen.append(len({b for s in req.seqs for b in s.block_table}))
        return out

    engine.step = watch
    c = dict(prompt=prompt, width=4, length_penalty=1.0, early_stopping=False, max_tokens=24, stop=2)
    (o,) = llm.generate([{"prompt_token_ids": prompt}], _params(c))
    assert engine.stats()["prompt_tokens_computed"] == len(prompt)
    per_beam = -(-(len(prompt) + 24) // engine.block_manager.block_size)
    assert max(seen) < 4 * per_beam / 2  # 4 beams in well under twice one beam's blocks
    assert [x.token_ids for x in o.outputs] == _reference(hf, c)[0]


def test_logprobs_and_text(peaked, hf):
    c = _cases(hf, 1, seed=3)[0]
    c["width"] = 3
    llm = LLM(peaked, dtype="float32", kv_cache_memory_bytes=16 * 2**20)
    (o,) = llm.generate([{"prompt_token_ids": c["prompt"]}], _params(c, logprobs=2))
    tok = llm.engine.tokenizer
    for x in o.outputs:
        assert len(x.logprobs) == len(x.token_ids)
        chosen = [e[t].logprob for e, t in zip(x.logprobs, x.token_ids)]
        assert sum(chosen) == pytest.approx(x.cumulative_logprob, abs=1e-4)
        for e, t in zip(x.logprobs, x.token_ids):  # the top 2 and the chosen token, ranked
            assert len(e) <= 3 and sorted(v.rank for v in e.values())[:2] == [1, 2]
            assert all(v.logprob >= e[t].logprob for v in e.values() if v.rank < e[t].rank)
        body = x.token_ids[:-1] if x.finish_reason == "stop" else x.token_ids
        assert x.text == tok.decode(body, skip_special_tokens=True)
    scores = [x.cumulative_logprob / len(x.token_ids) ** c["length_penalty"] for x in o.outputs]
    assert scores == sorted(scores, reverse=True)  # best first


def test_min_tokens_and_ignore_eos(peaked, hf):
    c = _cases(hf, 1, seed=4)[0]
    c.update(width=3, max_tokens=12)
    llm = LLM(peaked, dtype="float32", kv_cache_memory_bytes=16 * 2**20)
    (o,) = llm.generate([{"prompt_token_ids": c["prompt"]}], _params(c, min_tokens=12))
    assert all(len(x.token_ids) == 12 for x in o.outputs)
    with torch.no_grad():
        out = hf.generate(torch.tensor([c["prompt"]]), max_new_tokens=12, min_new_tokens=12, num_beams=3,
                          num_return_sequences=3, do_sample=False, eos_token_id=[2, c["stop"]], pad_token_id=0,
                          attention_mask=torch.ones(1, len(c["prompt"]), dtype=torch.long))
    assert [x.token_ids for x in o.outputs] == out[:, len(c["prompt"]):].tolist()


@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("repetition_penalty", 1.2), ("stop", ["x"]),
                                         ("logit_bias", {5: 1.0}), ("length_penalty", "long"),
                                         ("length_penalty", 1100.0),
                                         ("early_stopping", "sometimes"), ("max_reasoning_tokens", 0)])
def test_refused_combinations_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(n=2, use_beam_search=True, **{field: value}).validate()


def test_a_search_that_could_wait_forever_is_refused(peaked):
    """Beams run in lockstep: a search the cache cannot hold at full length, or wider than
    max_num_seqs, would wait on itself; it is refused up front, and nothing is held."""
    llm = _llm(peaked, 8, 4, max_model_len=32, max_num_seqs=2)
    with pytest.raises(ValueError, match="^n: beam search with 2 beams"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(n=2, use_beam_search=True, max_tokens=20))
    with pytest.raises(ValueError, match="^n: beam search runs its 3 beams at once"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(n=3, use_beam_search=True, max_tokens=2))
    assert llm.engine.block_manager.num_free_blocks == 8 and not llm.engine.has_unfinished_requests()
    # Test-time compute's beam search: a later prompt that cannot fit is refused before any prompt is queued.
    added = []
    llm.engine.add_request = lambda *a, _add=llm.engine.add_request, **k: added.append(_add(*a, **k)) or added[-1]
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(5, 25))}]
    with pytest.raises(ValueError, match="^n: beam search with 2 beams of up to 28 tokens"):
        llm.generate(prompts, SamplingParams(max_tokens=8), test_time_compute={"strategy": "beam_search", "n": 2})
    assert added == [] and llm.engine.block_manager.num_free_blocks == 8
    out = llm.generate(prompts[:1], SamplingParams(max_tokens=8), test_time_compute={"strategy": "beam_search", "n": 2})
    assert len(added) == 1 and len(out[0].outputs[0].token_ids) >= 1


def test_aborting_one_beam_ends_the_search(peaked):
    llm = LLM(peaked, dtype="float32", kv_cache_memory_bytes=16 * 2**20)
    eng = llm.engine
    rid = eng.add_request({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(n=3, use_beam_search=True, max_tokens=30,
                                                                             ignore_eos=True))
    for _ in range(3):
        eng.step()
    out = eng.abort_seq(rid, 1)
    assert out is not None and out.finished and not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


# -- the rules without a model ---------------------------------------------------------------
def _row(pairs: dict[int, float]) -> tuple[list[int], list[float]]:
    items = sorted(pairs.items(), key=lambda kv: -kv[1])
    return [t for t, _ in items], [v for _, v in items]


def test_first_step_takes_beam_zero_only_and_forks():
    bs = BeamSearch(2, stop_ids=(0,), max_new_tokens=5)
    row = _row({1: math.log(0.5), 2: math.log(0.3), 3: math.log(0.15), 0: math.log(0.05)})
    conts = bs.select([row, row], lambda s: ([], None, 0.0))
    assert [(c.slot, c.parent, c.token) for c in conts] == [(0, 0, 1), (1, 0, 2)]
    assert not bs.finished and not bs.done


def test_stop_among_top_w_finishes_a_hypothesis_and_the_rest_run_on():
    bs = BeamSearch(2, stop_ids=(0,), max_new_tokens=5)
    bs.select([_row({1: -0.1, 2: -2.0, 3: -3.0, 0: -4.0})] * 2, lambda s: ([], None, 0.0))
    hist = {0: [1], 1: [2]}
    conts = bs.select([_row({0: -0.05, 5: -3.0, 6: -4.0, 7: -5.0}), _row({8: -0.2, 9: -0.5, 0: -6.0, 4: -7.0})],
                      lambda s: (hist[s], None, 0.0))
    assert [h.tokens for h in bs.finished] == [[1, 0]]
    assert bs.finished[0].score == pytest.approx((-0.1 - 0.05) / 2)
    # the running beams: both continuations of beam 1 (2 -> 8, 2 -> 9); beam 0 stopped, so its slot is reused
    assert sorted((c.parent, c.token) for c in conts) == [(1, 8), (1, 9)]
    assert sorted(c.slot for c in conts) == [0, 1]


def test_search_ends_when_running_beams_cannot_win():
    bs = BeamSearch(1, stop_ids=(0,), max_new_tokens=50)
    conts = bs.select([_row({0: -0.1, 1: -0.2, 2: -5.0})], lambda s: ([], None, 0.0))  # finishes [0] at -0.1
    # transformers' heuristic: the best running beam (-0.2 at its current length) cannot beat -0.1
    assert conts == [] and bs.done and [h.tokens for h in bs.finished] == [[0]]
    bs = BeamSearch(1, stop_ids=(0,), max_new_tokens=50, length_penalty=2.0, early_stopping="never")
    bs.select([_row({0: -0.1, 1: -0.2, 2: -5.0})], lambda s: ([], None, 0.0))
    assert not bs.done  # "never" with a positive penalty judges the running beam at max length: -0.2 / 50**2


def test_max_tokens_finishes_the_top_w():
    bs = BeamSearch(2, stop_ids=(0,), max_new_tokens=1)
    conts = bs.select([_row({3: -0.1, 4: -0.2, 5: -0.3, 0: -9.0})] * 2, lambda s: ([], None, 0.0))
    assert conts == [] and bs.done
    assert [(h.tokens, h.stopped) for h in bs.finished] == [([3], False), ([4], False)]


def test_min_tokens_bans_stop_candidates():
    bs = BeamSearch(1, stop_ids=(0,), max_new_tokens=5, min_tokens=2)
    conts = bs.select([_row({0: -0.01, 7: -5.0, 8: -6.0})], lambda s: ([], None, 0.0))
    assert [c.token for c in conts] == [7] and not bs.finished


# -- as a test-time-compute strategy, offline and over HTTP -----------------------------------
def test_ttc_beam_search_answers_with_the_best_beam(peaked, hf):
    c = _cases(hf, 1, seed=5)[0]
    c.update(width=4, max_tokens=20)
    llm = LLM(peaked, dtype="float32", kv_cache_memory_bytes=16 * 2**20)
    (beams,) = llm.generate([{"prompt_token_ids": c["prompt"]}], _params(c))
    sp = SamplingParams(max_tokens=20, stop_token_ids=[c["stop"]], length_penalty=c["length_penalty"])
    (o,) = llm.generate([{"prompt_token_ids": c["prompt"]}], sp,
                        test_time_compute={"strategy": "beam_search", "n": 4, "length_penalty": c["length_penalty"]})
    acct = o.test_time_compute
    assert o.outputs[0].token_ids == beams.outputs[0].token_ids
    assert acct["strategy"] == "beam_search" and acct["paths_started"] == 4 and acct["winner_path"] == 0
    assert acct["tokens"]["generated"] == sum(len(x.token_ids) for x in beams.outputs)
    # A hard budget: 4 beams of at most (budget - prompt) // 4 tokens each.
    budget = len(c["prompt"]) + 4 * 5
    (o,) = llm.generate([{"prompt_token_ids": c["prompt"]}], sp,
                        test_time_compute={"strategy": "beam_search", "n": 4, "max_total_tokens": budget})
    assert o.test_time_compute["tokens"]["total"] <= budget and len(o.outputs[0].token_ids) <= 5
    with pytest.raises(ValueError, match="^test_time_compute.early_stop:"):
        llm.generate("Hi", sp, test_time_compute={"strategy": "beam_search", "early_stop": True})


@pytest.fixture(scope="module")
def server(peaked, tmp_path_factory):
    from tests.server_utils import ServerProcess

    s = ServerProcess(peaked, "--kv-cache-memory", "0.0625", log_path=str(tmp_path_factory.mktemp("beam") / "log"))
    yield s
    s.stop()


def test_completions_use_beam_search_over_http(server, client, peaked, hf):
    """vLLM's extra fields on /v1/completions: n beams, best first, equal to transformers' (also
    streamed: the beams arrive once the search ends)."""
    model_name = os.path.basename(peaked)
    c = _cases(hf, 1, seed=6)[0]
    c.update(width=3, max_tokens=16)
    ref, _ = _reference(hf, c)
    body = {"use_beam_search": True, "length_penalty": c["length_penalty"], "early_stopping": c["early_stopping"],
            "stop_token_ids": [c["stop"]]}
    r = client.completions.create(model=model_name, prompt=c["prompt"], n=3, max_tokens=16, extra_body=body,
                                  logprobs=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(peaked)  # the server decodes with the same tokenizer
    texts = [tok.decode(t[:-1] if t[-1] in (2, c["stop"]) else t, skip_special_tokens=True) for t in ref]
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == texts
    assert r.usage.completion_tokens == sum(len(t) for t in ref)
    chunks = list(client.completions.create(model=model_name, prompt=c["prompt"], n=3, max_tokens=16,
                                            extra_body=body, stream=True))
    streamed = {}
    for ch in chunks:
        for x in ch.choices:
            streamed[x.index] = streamed.get(x.index, "") + x.text
    assert [streamed[i] for i in range(3)] == texts
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="Hi", n=2, max_tokens=4,
                                  extra_body={"use_beam_search": True, "presence_penalty": 0.5})
    assert "presence_penalty: not supported with use_beam_search" in str(e.value)
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], n=2,
                                       max_tokens=8, extra_body={"use_beam_search": True})
    assert len(r.choices) == 2
