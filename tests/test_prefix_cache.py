"""Prefix caching through the real engine: outputs with cache hits equal cold prefill.

For four architectures, waves of requests that share prefixes run through an engine with
prefix caching and a small KV cache (so hits end mid-chunk, blocks are evicted and
re-admitted, sequences are preempted and resume from their own cached blocks, and n > 1
samples fork off one prefill). Every request is also run cold, alone, on an engine without
prefix caching. Greedy and seeded tokens must be identical and logprobs equal within 1e-5.
"""

from __future__ import annotations

import random

import pytest

from tests.models import make_model
from tokenmill import LLM, SamplingParams
from tokenmill.config import ModelConfig

BLOCK = 16
ARCHS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": 40},  # windows smaller than the prompts: cached blocks beyond the window
}


def _kv_bytes(path: str, blocks: int) -> int:
    mc = ModelConfig.from_pretrained(path)
    return blocks * 2 * mc.num_layers * BLOCK * mc.num_kv_heads * mc.head_dim * 4


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_dir(request, tmp_path_factory):
    arch = request.param
    return make_model(str(tmp_path_factory.mktemp(f"pc-{arch}")), arch, seed=3, tokenizer=False,
                      max_position_embeddings=256, **ARCHS[arch])


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


def _params(i: int, n: int = 1) -> SamplingParams:
    if i % 3 == 2:  # seeded sampling: the same seed must draw the same tokens from the same logits
        return SamplingParams(max_tokens=10, temperature=0.8, top_k=50, seed=100 + i, logprobs=3, n=n)
    return SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, n=n, ignore_eos=True)


def _waves(rng: random.Random) -> list[list[list[int]]]:
    p1, p2 = _ids(rng, 40), _ids(rng, 70)
    warm = [p1 + _ids(rng, 5), p2 + _ids(rng, 3)]
    hits = [p1 + _ids(rng, 1), p1 + _ids(rng, 30), p2 + _ids(rng, 60), list(warm[1]), p2[:48] + _ids(rng, 2)]
    crowd = [p1 + _ids(rng, rng.randint(0, 40)) for _ in range(7)] + [_ids(rng, 50)]
    evict = [_ids(rng, 100) for _ in range(3)]
    again = [list(hits[1]), list(hits[2]), p2 + warm[1][70:] + _ids(rng, 4)]
    return [warm, hits, crowd, evict, again]


def _assert_same(got, want, where: str) -> None:
    assert got.token_ids == want.token_ids, f"{where}: tokens differ"
    for pos, (a, b) in enumerate(zip(got.logprobs, want.logprobs)):
        assert a.keys() == b.keys(), f"{where}: top tokens differ at {pos}"
        for tok in a:
            assert a[tok].logprob == pytest.approx(b[tok].logprob, abs=1e-5), f"{where}: logprob at {pos}"


def test_cache_hits_are_exact_across_chunks_eviction_preemption_and_n(arch_dir):
    # 20 blocks (320 tokens) and 24-token chunks: hits end mid-chunk, the crowd wave preempts,
    # the evict wave pushes cached prefixes out before they are asked for again.
    llm = LLM(arch_dir, kv_cache_memory_bytes=_kv_bytes(arch_dir, 20), max_num_batched_tokens=24, max_model_len=256,
              block_size=BLOCK, seed=0)
    cold = LLM(arch_dir, kv_cache_memory_bytes=_kv_bytes(arch_dir, 64), max_num_batched_tokens=512,
               max_model_len=256, block_size=BLOCK, seed=0, enable_prefix_caching=False)
    engine = llm.engine
    rng = random.Random(7)
    i = 0
    mid_chunk_hits = 0
    for w, wave in enumerate(_waves(rng)):
        params = [_params(i + k) for k in range(len(wave))]
        outs = llm.generate([{"prompt_token_ids": p} for p in wave], params)
        for k, (prompt, sp, out) in enumerate(zip(wave, params, outs)):
            ref = cold.generate({"prompt_token_ids": prompt}, sp)[0]
            _assert_same(out.outputs[0], ref.outputs[0], f"wave {w} request {k}")
            if out.num_cached_tokens and (len(prompt) - out.num_cached_tokens) % 24:
                mid_chunk_hits += 1
        i += len(wave)
    bm = engine.block_manager
    assert bm.num_hit_tokens > 0 and mid_chunk_hits > 0
    assert bm.num_evictions > 0, "the small cache should have evicted cached blocks"
    assert engine.scheduler.num_preemptions > 0, "the crowd wave should have preempted"

    # n > 1: samples fork off one prefill; each equals a cold single request seeded seed + i.
    prompt = _waves(random.Random(7))[1][1]
    for sp in (SamplingParams(max_tokens=8, temperature=0.9, seed=5, n=4, logprobs=2),
               SamplingParams(max_tokens=8, temperature=0.0, n=3, logprobs=2, ignore_eos=True)):
        out = llm.generate({"prompt_token_ids": prompt}, sp)[0]
        assert out.num_cached_tokens > 0
        for c in out.outputs:
            single = SamplingParams(max_tokens=8, temperature=sp.temperature, logprobs=2, ignore_eos=sp.ignore_eos,
                                    seed=None if sp.seed is None else sp.seed + c.index)
            ref = cold.generate({"prompt_token_ids": prompt}, single)[0]
            _assert_same(c, ref.outputs[0], f"n={sp.n} sample {c.index}")
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks


def test_prompt_logprobs_are_complete_with_a_cached_prefix(llm):
    rng = random.Random(11)
    prefix = _ids(rng, 40)
    sp = SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0)
    llm.generate({"prompt_token_ids": prefix + _ids(rng, 4)}, SamplingParams(max_tokens=1))  # warm the cache
    prompt = prefix + _ids(rng, 9)
    out = llm.generate({"prompt_token_ids": prompt}, sp)[0]
    assert out.num_cached_tokens == 0  # prompt-logprob requests compute the whole prompt
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    llm.engine.reset_prefix_cache()
    cold = llm.generate({"prompt_token_ids": prompt}, sp)[0]
    for a, b, tok in zip(out.prompt_logprobs[1:], cold.prompt_logprobs[1:], prompt[1:]):
        assert a[tok].logprob == pytest.approx(b[tok].logprob, abs=1e-5)


def test_n_samples_prefill_the_prompt_once(model_dir):
    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=32, seed=0)
    engine = llm.engine
    prompt_tokens = 0
    orig = engine.scheduler.schedule

    def counting():
        out = orig()
        nonlocal prompt_tokens
        for s in out.scheduled:
            end = min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens)
            prompt_tokens += max(0, end - s.start)
        return out

    engine.scheduler.schedule = counting
    prompt = list(range(10, 87))  # 77 tokens: 4 full blocks and a shared partial one, in 3 chunks
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=1))[0]
    assert prompt_tokens == len(prompt)
    assert len(out.outputs) == 4 and all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_cached_tokens_for_three_requests_sharing_a_40_token_prefix(model_dir):
    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, seed=0)
    prefix = list(range(100, 140))
    outs = [llm.generate({"prompt_token_ids": prefix + [200 + i] * 6}, SamplingParams(max_tokens=2))[0]
            for i in range(3)]
    assert [o.num_cached_tokens for o in outs] == [0, 32, 32]
    stats = llm.engine.stats()
    assert stats["prefix_cache_queries"] == 3 * 46 and stats["prefix_cache_hits"] == 64
    # Salts: a salted request shares nothing with unsalted ones, but does with its own salt.
    salted = [llm.generate({"prompt_token_ids": prefix + [7] * 6, "cache_salt": s}, SamplingParams(max_tokens=2))[0]
              for s in ("tenant-a", "tenant-b", "tenant-a")]
    assert [o.num_cached_tokens for o in salted] == [0, 0, 32]
    for bad in ("", "\ud800", 5):
        with pytest.raises(ValueError, match="cache_salt"):
            llm.engine.add_request({"prompt_token_ids": prefix, "cache_salt": bad}, SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def test_caching_off_computes_everything(model_dir):
    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, seed=0, enable_prefix_caching=False)
    prefix = list(range(100, 140))
    outs = [llm.generate({"prompt_token_ids": prefix + [i]}, SamplingParams(max_tokens=2))[0] for i in range(2)]
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert llm.engine.stats()["prefix_cache_queries"] == 0
