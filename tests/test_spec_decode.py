"""Speculative decoding (n-gram lookup and draft model): exact greedy output on every architecture
with chunked prefill, preemption and prefix caching in play; the sampled distribution stays the
target's (chi-square against transformers); configuration errors; metrics over HTTP."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from tests.models import ARCH_CONFIGS, make_model
from tests.server_utils import ServerProcess
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig, SpeculativeConfig
from tokenmill.engine.spec_decode import NgramIndex, verify

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {arch: make_model(str(root / arch), arch, seed=3, tokenizer=False) for arch in ARCH_CONFIGS}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A smaller Llama with the test vocabulary: a different model, so drafts are often rejected."""
    return make_model(str(tmp_path_factory.mktemp("draft") / "m"), "llama", seed=11, tokenizer=False,
                      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)


def _prompts(seed: int = 0) -> list[list[int]]:
    """Prompts that repeat themselves (so n-grams match) and ones that do not, long and short."""
    rng = random.Random(seed)
    out = []
    for i in range(10):
        unit = [rng.randrange(3, 500) for _ in range(rng.randrange(3, 12))]
        noise = [rng.randrange(3, 500) for _ in range(30 + 9 * i)]
        out.append((unit * 40)[: rng.randrange(8, 200)] if i % 2 == 0 else noise)
    return out


def _params() -> list[SamplingParams]:
    ps = [SamplingParams(temperature=0, max_tokens=24 + 7 * (i % 4), ignore_eos=True) for i in range(10)]
    ps[3] = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[7, 300], ignore_eos=True)
    ps[5] = SamplingParams(temperature=0, max_tokens=30, logprobs=2, ignore_eos=True)
    ps[7] = SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, ignore_eos=True)  # no drafts
    return ps


def _run(llm: LLM, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


def _engine(model: str, spec=None, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_bytes", 1 << 24)
    return LLM(model, speculative_config=spec, **kw)


def _assert_same(base, spec):
    for a, b in zip(base, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        if a.outputs[0].logprobs is not None:
            assert len(b.outputs[0].logprobs) == len(a.outputs[0].logprobs)
            for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert ea.keys() == eb.keys()
                for t in ea:
                    assert eb[t].logprob == pytest.approx(ea[t].logprob, abs=1e-4)
                    assert eb[t].rank == ea[t].rank


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_ngram_greedy_identical_every_arch(arch_dirs, arch):
    d = arch_dirs[arch]
    prompts, params = _prompts(), _params()
    base = _run(_engine(d, enable_prefix_caching=False), prompts, params)
    # Chunked prefill (a 48-token budget), prefix caching (the second round hits the cache).
    llm = _engine(d, NGRAM, max_num_batched_tokens=48)
    for _ in range(2):
        _assert_same(base, _run(llm, prompts, params))
    st = llm.engine.spec_stats
    assert st.num_accepted_tokens > 20 and st.num_draft_tokens > st.num_accepted_tokens
    assert llm.engine.block_manager.num_hit_tokens > 0
    assert llm.engine.block_manager.num_used_blocks == 0


def test_ngram_greedy_identical_under_preemption(arch_dirs):
    d = arch_dirs["llama"]
    prompts, params = _prompts(1), _params()
    base = _run(_engine(d), prompts, params)
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads of 16, float32
    llm = _engine(d, NGRAM, kv_cache_memory_bytes=48 * per_block, max_model_len=256)
    _assert_same(base, _run(llm, prompts, params))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.spec_stats.num_accepted_tokens > 0


@pytest.mark.parametrize("draft", ["other", "same"])
def test_draft_model_greedy_identical(arch_dirs, draft_dir, draft):
    d = arch_dirs["llama"]
    spec = {"method": "draft_model", "model": draft_dir if draft == "other" else d, "num_speculative_tokens": 3}
    prompts, params = _prompts(2), _params()
    base = _run(_engine(d), prompts, params)
    llm = _engine(d, spec, max_num_batched_tokens=48)
    for _ in range(2):  # the second round takes prompts (and their draft KV) from the prefix cache
        _assert_same(base, _run(llm, prompts, params))
    st = llm.engine.spec_stats
    assert st.num_draft_tokens > 100
    if draft == "same":
        # The target as its own draft: every draft must be accepted, which holds only if the
        # draft's KV is right at every position (chunked prompts, forks, cached prefixes).
        assert st.num_accepted_tokens == st.num_draft_tokens
    else:
        assert 0 < st.num_accepted_tokens < st.num_draft_tokens


def test_draft_model_under_preemption(arch_dirs):
    d = arch_dirs["qwen3"]
    spec = {"method": "draft_model", "model": d, "num_speculative_tokens": 4}
    prompts, params = _prompts(3), _params()
    base = _run(_engine(d), prompts, params)
    per_block = 2 * (2 * 2 * 16 * 2 * 32 * 4)  # target and draft: K and V, 2 layers, 2 KV heads of 32
    llm = _engine(d, spec, kv_cache_memory_bytes=24 * per_block, max_model_len=256)
    _assert_same(base, _run(llm, prompts, params))
    assert llm.engine.scheduler.num_preemptions > 0
    st = llm.engine.spec_stats
    assert st.num_accepted_tokens == st.num_draft_tokens > 0


def test_n_samples_fork_with_drafts(arch_dirs):
    d = arch_dirs["llama"]
    p = SamplingParams(n=3, temperature=0, max_tokens=30, ignore_eos=True)
    prompt = [{"prompt_token_ids": [9, 10, 11, 12] * 10}]
    base = _engine(d).generate(prompt, p)[0]
    for spec in (NGRAM, {"method": "draft_model", "model": d, "num_speculative_tokens": 2}):
        llm = _engine(d, spec)
        out = llm.generate(prompt, p)[0]
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in base.outputs]
        assert llm.engine.spec_stats.num_accepted_tokens > 0


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value, cells with expected count < 5 pooled into one."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat.double() / 2))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_distribution_is_the_targets(tmp_path, method):
    """Tokens 2 and 3 (drafted and verified) follow the target's marginals, computed exactly with
    transformers over a 16-token vocabulary."""
    from transformers import AutoModelForCausalLM

    vocab = 16
    d = make_model(str(tmp_path / "small"), "llama", seed=5, tokenizer=False, vocab_size=vocab,
                   initializer_range=0.5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    prompt = list(range(vocab)) * 2  # every token has an earlier occurrence: n-grams always match
    # The target as its own (greedy) draft: accepted when sampling picks the argmax, rejected otherwise.
    temperature, top_p = 0.9, 0.95
    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
            if method == "ngram" else {"method": "draft_model", "model": d, "num_speculative_tokens": 3})
    llm = _engine(d, spec, max_num_seqs=256, seed=1234)
    p = SamplingParams(n=100, temperature=temperature, top_p=top_p, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 40, p)
    toks = torch.tensor([o.token_ids for r in outs for o in r.outputs])  # [4000, 3]
    st = llm.engine.spec_stats
    assert st.num_draft_tokens > 2000 and 0 < st.num_accepted_tokens < st.num_draft_tokens

    # Exact marginals of tokens 2 and 3 under the same temperature and top-p.
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()

    def dist(ctx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(ctx).logits[:, -1] / temperature
        probs = torch.softmax(logits, -1)
        sp, order = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp >= top_p  # keep the smallest prefix reaching top_p
        sp = sp.masked_fill(drop, 0)
        out = torch.zeros_like(probs).scatter_(1, order, sp)
        return out / out.sum(-1, keepdim=True)

    base = torch.tensor([prompt])
    p1 = dist(base)[0]  # [V]
    ctx1 = torch.cat([base.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
    p2_given_1 = dist(ctx1)  # [V, V]
    ctx2 = torch.cat([ctx1.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab)[:, None]], 1)
    p3_given_12 = dist(ctx2).view(vocab, vocab, vocab)
    joint12 = p1[:, None] * p2_given_1
    m2 = joint12.sum(0)
    m3 = (joint12[:, :, None] * p3_given_12).sum((0, 1))

    c2 = torch.bincount(toks[:, 1], minlength=vocab).double()
    c3 = torch.bincount(toks[:, 2], minlength=vocab).double()
    c12 = torch.bincount(toks[:, 0] * vocab + toks[:, 1], minlength=vocab * vocab).double()
    assert _chi2_pvalue(c2, m2) > 1e-3
    assert _chi2_pvalue(c3, m3) > 1e-3
    assert _chi2_pvalue(c12, joint12.flatten()) > 1e-3


def test_verify_rejection_rule_is_exact():
    """Unit check of the rule itself, including a draft the target gives probability 0, with the
    sampled sequences of a step verified together (a greedy one among them)."""
    torch.manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
    probs = torch.cat([p, p, torch.zeros(2, 4), p])  # rows of 4 sequences: drafts 0, 1, (greedy), 3
    argmax = probs.argmax(-1).tolist()
    argmax[4:6] = [2, 1]  # the greedy sequence's own rows: its draft 2 is right, then 1
    drafts = [[0], [1], [2], [3]]
    counts, bonus = torch.zeros(3, 4), torch.zeros(3, 4)
    for _ in range(20000):
        out = verify(argmax, probs, [0, 2, 4, 6], drafts, [False, False, True, False])
        assert out[2] == ([2, 1], 1)
        for c, b, (tokens, accepted), d in zip(counts, bonus, out[:2] + out[3:], (0, 1, 3)):
            c[tokens[0]] += 1
            assert accepted == (tokens[0] == d) and len(tokens) == 1 + accepted
            if accepted:  # the token after an accepted draft comes from the sequence's next row
                b[tokens[1]] += 1
    for c in counts:
        assert _chi2_pvalue(c, p[0]) > 1e-3
    for b in bonus[:2]:  # (draft 3 has probability 0: never accepted)
        assert b.sum() > 3000 and _chi2_pvalue(b, p[1]) > 1e-3
    assert bonus[2].sum() == 0
    assert verify([4, 5, 6], None, [0], [[4, 9]], [True]) == [([4, 5], 1)]  # greedy: the first mismatch ends it
    assert verify([4, 9, 6], None, [0], [[4, 9]], [True]) == [([4, 9, 6], 2)]


def test_ngram_index():
    idx = NgramIndex(1, 3)
    toks = [1, 2, 3, 4, 1, 2, 3]
    assert idx.propose(toks, 3) == [4, 1, 2]  # (1, 2, 3) first seen at 0: continuation from 3
    toks += [9]
    assert idx.propose(toks, 3) == []  # 9 never seen before
    toks += [1]
    assert idx.propose(toks, 2) == [2, 3]  # only the unigram (1) matches; first occurrence
    assert NgramIndex(2, 2).propose([5, 5], 4) == []  # the suffix itself is not an earlier occurrence
    assert NgramIndex(1, 1).propose([5, 5], 4) == [5]


def test_config_errors(arch_dirs, draft_dir, tmp_path):
    for bad, msg in [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 2},
         "prompt_lookup_min"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": draft_dir}, "'draft_model' only"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
        ({"method": "ngram", "num_speculative_tokens": 2, "speculative_model": "x"}, "unknown field"),
        ("{not json", "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=msg):
            EngineConfig(model=arch_dirs["llama"], speculative_config=bad).validate()
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}').prompt_lookup_max == 4
    other = make_model(str(tmp_path / "v"), "llama", tokenizer=False, vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary .* no tokenizer to compare"):
        _engine(arch_dirs["llama"], {"method": "draft_model", "model": other, "num_speculative_tokens": 2})


@pytest.mark.parametrize("pad", [64, -8])
def test_a_draft_whose_vocabulary_is_padded_to_another_size(tmp_path, pad):
    """Same tokenizer, embeddings padded to another size (Qwen2.5 0.5B-7B against 14B-72B): the
    draft proposes only ids the target has and reads the target's padding ids it lacks; the
    output is the target's alone, and a draft that is the target's own weights, padded or cut, is
    accepted almost always. Different tokenizers are refused."""
    import safetensors.torch

    from tests.models import VOCAB, save_tokenizer

    target = make_model(str(tmp_path / "t"), "llama", seed=3)
    draft = make_model(str(tmp_path / "d"), "llama", vocab_size=VOCAB + pad)
    weights = safetensors.torch.load_file(os.path.join(target, "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[k]
        weights[k] = torch.cat([w, torch.zeros(pad, w.shape[1])]) if pad > 0 else w[:pad].contiguous()
    safetensors.torch.save_file(weights, os.path.join(draft, "model.safetensors"), metadata={"format": "pt"})
    # Prompts with the target's last ids, which a draft cut short lacks.
    prompts = [[VOCAB - 1, 5, VOCAB - 3, 9] * 6, list(range(VOCAB - 40, VOCAB))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in _run(_engine(target), prompts, params)]
    llm = _engine(target, {"model": draft, "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in _run(llm, prompts, params)] == want
    # Where every id is one both have, they are the same model: drafts are accepted.
    both = [p for p in ([5, 9, 14, 27] * 6, list(range(40, 80)), [7, 300, 12] * 5, list(range(100, 130)))
            if max(p + _run(_engine(target), [p], params)[0].outputs[0].token_ids) < min(VOCAB, VOCAB + pad)]
    llm = _engine(target, {"model": draft, "num_speculative_tokens": 3})
    _run(llm, both, params)
    stats = llm.engine.spec_stats
    assert stats.num_accepted_tokens >= 0.8 * stats.num_draft_tokens > 0, stats
    save_tokenizer(draft, chat_template="{{ messages }}")  # (the template is not the vocabulary: accepted)
    _engine(target, {"model": draft, "num_speculative_tokens": 3})
    with open(os.path.join(draft, "tokenizer.json")) as f:
        doc = json.load(f)
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(os.path.join(draft, "tokenizer.json"), "w") as f:
        json.dump(doc, f)
    with pytest.raises(ValueError, match="their tokenizers differ"):
        _engine(target, {"model": draft, "num_speculative_tokens": 3})


def test_server_speculative_config_and_metrics(arch_dirs, tmp_path):
    import openai

    d = arch_dirs["llama"]
    srv = ServerProcess(d, "--kv-cache-memory", "0.02", "--log-level", "warning",
                        "--speculative-config", json.dumps(NGRAM), log_path=str(tmp_path / "server.log"))
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        out = client.completions.create(model="llama", prompt=[[7, 8, 9, 10] * 12], max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 40
        base = _engine(d).generate([{"prompt_token_ids": [7, 8, 9, 10] * 12}],
                                   SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
        assert client.completions.create(model="llama", prompt=[[7, 8, 9, 10] * 12], max_tokens=40, temperature=0,
                                         logprobs=1, extra_body={"ignore_eos": True,
                                                                 "return_tokens_as_token_ids": True}
                                         ).choices[0].logprobs.tokens == [
                                             f"token_id:{t}" for t in base.outputs[0].token_ids]
        drafted = srv.metric("tokenmill:spec_decode_num_draft_tokens_total")
        accepted = srv.metric("tokenmill:spec_decode_num_accepted_tokens_total")
        assert drafted >= accepted > 0
        assert srv.metric("tokenmill:spec_decode_num_drafts_total") > 0
    finally:
        srv.stop()


def test_bench_spec_decode_runs_both_in_one_run(tmp_path):
    import argparse

    from tokenmill.bench.spec_decode import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "sd.json"
    res = run(p.parse_args(["--num-prompts", "2", "--max-tokens", "24", "--json", str(out)]))
    assert res["identical_outputs"] and res["draft_tokens"] > 0
    assert res["spec_decode_tok_s"] > 0 and res["baseline_decode_tok_s"] > 0
    assert json.loads(out.read_text())["speedup"] == pytest.approx(res["speedup"])


def test_bench_spec_decode_workloads_for_a_gpu(tmp_path):
    """The two runs scripts/gpu/check.sh spec makes: the chain model with its small sibling as the
    draft model, and n-gram drafts on a random model of a named shape from its config.json alone."""
    import argparse

    from tokenmill.bench.spec_decode import add_arguments, run
    from tokenmill.llm import default_model_path

    p = argparse.ArgumentParser()
    add_arguments(p)
    demos = os.path.join(os.path.dirname(default_model_path()), "demo_models")
    draft = {"method": "draft_model", "model": os.path.join(demos, "chain_small"), "num_speculative_tokens": 4}
    res = run(p.parse_args(["--model", os.path.join(demos, "chain"), "--workload", "chain", "--num-prompts", "1",
                            "--max-tokens", "60", "--speculative-config", json.dumps(draft)]))
    assert res["identical_outputs"] and res["acceptance_rate"] > 0.5  # the sibling is right most of the time
    folder = tmp_path / "shape"
    res = run(p.parse_args(["--model", str(folder), "--shape", "smollm-135m", "--load-format", "dummy",
                            "--workload", "random", "--num-prompts", "1", "--prompt-len", "16", "--max-tokens", "24"]))
    assert sorted(os.listdir(folder)) == ["config.json"] and res["draft_tokens"] > 0 and res["identical_outputs"]


def test_drafts_never_displace_other_sequences():
    """Drafts take only blocks and budget left over: here none, so both decodes run plainly and
    nothing is preempted (drafts first would have taken the last block)."""
    from tokenmill.engine.block_manager import BlockManager
    from tokenmill.engine.scheduler import Scheduler
    from tokenmill.engine.sequence import Request

    bm = BlockManager(4, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, 8, 64, propose=lambda seq, budget: min(4, budget))
    reqs = [Request(str(i), None, [1, 2, 3, 4], SamplingParams(max_tokens=5), float(i)) for i in range(2)]
    for r in reqs:
        sched.add_request(r.seqs)
    sched.advance(sched.schedule())
    for r in reqs:
        r.seqs[0].token_ids.append(7)
    out = sched.schedule()
    assert [(s.num_new_tokens, s.num_spec) for s in out.scheduled] == [(1, 0), (1, 0)] and not out.preempted
    sched.advance(out)
    sched.finish(reqs[1].seqs[0])  # blocks free up: the remaining decode takes drafts
    reqs[0].seqs[0].token_ids.append(8)
    out = sched.schedule()
    assert [(s.num_new_tokens, s.num_spec) for s in out.scheduled] == [(5, 4)]


def test_seeded_requests_do_not_depend_on_neighbours(arch_dirs):
    d = arch_dirs["llama"]
    prompt = {"prompt_token_ids": [9, 10, 11, 12] * 10}
    p = SamplingParams(max_tokens=40, temperature=0.3, seed=42, ignore_eos=True)
    others = [{"prompt_token_ids": [20 + i, 30, 40 + i] * 5} for i in range(5)]
    q = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    llm = _engine(d, NGRAM, max_num_batched_tokens=8)
    alone = llm.generate([prompt], p)[0].outputs[0].token_ids
    mixed = llm.generate(others + [prompt], [q] * 5 + [p])[-1].outputs[0].token_ids
    assert alone == mixed
    assert llm.engine.spec_stats.num_accepted_tokens > 0  # the greedy neighbours did speculate


def test_cached_blocks_hold_the_draft_models_kv(arch_dirs):
    """A block enters the prefix cache only once the draft's KV covers it: after a preemption
    that lands right after all drafts were accepted, the re-admitted sequence (the target as its
    own draft) still has every draft accepted."""
    d = arch_dirs["llama"]
    llm = _engine(d, {"method": "draft_model", "model": d, "num_speculative_tokens": 3})
    eng = llm.engine
    rng = random.Random(0)
    prompt = [rng.randrange(3, 500) for _ in range(20)]
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    eng.add_request({"prompt_token_ids": prompt}, p, request_id="a")
    seq = eng.requests["a"].seqs[0]
    while not (seq.num_computed_tokens % 16 == 0 and seq.num_draft_computed < seq.num_computed_tokens):
        eng.step()
        assert not seq.is_finished
    eng.scheduler._preempt(seq)
    before = eng.spec_stats.num_draft_tokens, eng.spec_stats.num_accepted_tokens
    while eng.has_unfinished_requests():
        eng.step()
    drafted = eng.spec_stats.num_draft_tokens - before[0]
    assert drafted > 0 and eng.spec_stats.num_accepted_tokens - before[1] == drafted
    base = _engine(d).generate([{"prompt_token_ids": prompt}], p)[0].outputs[0].token_ids
    assert seq.output_token_ids == base
