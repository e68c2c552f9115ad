"""The runner's persistent batch (engine/input_batch.py) and the sampler's candidate path.

Every step of real engine runs (chunked prefill, prefix caching, n > 1 forks with copy-on-write,
preemption, beam search, speculative decoding) is checked against `build_batch`, which builds the
same inputs from scratch out of the sequences' block tables: the incremental updates must never
leave a stale entry where a step reads.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # (before anything imports Triton: the sampler's kernel runs interpreted)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.models import VOCAB, make_model
from tokenmill import LLM, SamplingParams
from tokenmill.engine.input_batch import Staging
from tokenmill.engine.model_runner import build_batch
from tokenmill.engine.sequence import Request
from tokenmill.sample import Sampler, SamplingMetadata
from tokenmill.sample.sampler import draws, sample_rows


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("ib") / "m"), initializer_range=0.3)


def _checked(llm: LLM) -> list[int]:
    """Wraps the runner's prepare so that every step's inputs are compared with build_batch's."""
    runner = llm.engine.runner
    prepare = runner.prepare
    steps = [0, 0]  # steps, and inputs read from the step in flight (async scheduling)

    def checked(out, prev=None):
        inp = prepare(out, prev)
        chunks = []
        for s in inp.order:
            seq = s.seq
            end = s.start + s.num_new_tokens - s.num_spec
            ids = seq.token_ids[s.start : end]
            if end > len(seq.token_ids):  # pending: the token the step in flight sampled for it
                ids.append(int(prev.tokens[prev.token_row(seq.seq_id)]))
                steps[1] += 1
            ids += seq.spec_token_ids[: s.num_spec]
            chunks.append((ids, s.start, s.seq.block_table))
        ids, pos, ref = build_batch(chunks, runner.block_size, runner.device)
        meta = inp.meta
        assert inp.input_ids.tolist() == ids.tolist()
        assert inp.positions.tolist() == pos.tolist()
        assert meta.slot_mapping.tolist() == ref.slot_mapping.tolist()
        assert meta.query_start_loc.tolist() == ref.query_start_loc.tolist()
        assert meta.seq_lens.tolist() == ref.seq_lens.tolist()
        assert (meta.num_decodes, meta.max_query_len, meta.max_seq_len) == (ref.num_decodes, ref.max_query_len,
                                                                          ref.max_seq_len)
        assert meta.query_start_loc_cpu == ref.query_start_loc_cpu and meta.seq_lens_cpu == ref.seq_lens_cpu
        for i, n in enumerate(ref.seq_lens_cpu):  # every entry a step may read (past them: never read)
            used = -(-n // runner.block_size)
            assert meta.block_tables[i, :used].tolist() == ref.block_tables[i, :used].tolist()
        # The LM head's rows: each sampled chunk's last row (once per fork too), then every row of
        # each chunk with drafts.
        qsl, sampled, drafted = ref.query_start_loc_cpu, [], []
        for i, s in enumerate(inp.order):
            if s.num_spec:
                drafted.extend(range(qsl[i], qsl[i + 1]))
            elif s.completes:
                sampled.extend([qsl[i + 1] - 1] * (1 + len(s.forks)))
        assert inp.head_rows.tolist() == sampled + drafted
        steps[0] += 1
        return inp

    runner.prepare = checked
    return steps


def _prompts(seed: int, count: int, shared: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(shared)]
    return [prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 70))] for _ in range(count)]


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_inputs_equal_a_fresh_build_through_preemption_forks_and_prefix_hits(model, async_scheduling):
    # 30 blocks of 8 tokens: 24 sequences cannot all fit, so some are preempted and recompute; n = 3
    # forks share a partly filled block (copy-on-write); shared prefixes hit the cache. With async
    # scheduling, decodes read their input from the step in flight.
    llm = LLM(model, dtype="float32", block_size=8, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=160,
              kv_cache_memory_bytes=30 * 8 * 512, async_scheduling=async_scheduling)
    assert llm.engine.block_manager.num_blocks == 30
    steps = _checked(llm)
    copies = []
    copy_blocks = llm.engine.runner.copy_blocks
    llm.engine.runner.copy_blocks = lambda c: (copies.extend(c), copy_blocks(c))
    prompts = _prompts(0, 12, shared=21) + _prompts(1, 12)
    params = [SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=i, n=3 if i % 4 == 0 else 1,
                             ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_hit_tokens > 0
    assert copies  # forks wrote into a shared partly filled block: copy-on-write replaced table entries
    assert all(len(c.token_ids) == 30 for o in outs for c in o.outputs)
    assert steps[0] > 30
    assert (steps[1] > 100) == (async_scheduling == "on")
    # Every finished sequence gives its row back (at the next step, which has nothing to run).
    assert llm.engine.step() == [] and len(llm.engine.runner.batch) == 0


def test_inputs_equal_a_fresh_build_with_beams_and_drafts(model):
    llm = LLM(model, dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 2})
    steps = _checked(llm)
    unit = [5, 9, 13, 17, 21]
    prompts = [(unit * 10)[: 13 + i] for i in range(6)]
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=20, temperature=0,
                                                                               ignore_eos=True))
    assert llm.engine.spec_stats.num_draft_tokens > 0
    llm = LLM(model, dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22)
    steps = _checked(llm)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:3]],
                 SamplingParams(n=3, use_beam_search=True, max_tokens=12, temperature=0, ignore_eos=True))
    assert steps[0] > 10


def test_rows_are_reused_and_grow(model):
    from tokenmill.engine.input_batch import InputBatch

    llm = LLM(model, dtype="float32", max_num_seqs=40, kv_cache_memory_bytes=1 << 22)
    runner = llm.engine.runner
    batch = runner.batch = InputBatch(runner.block_size, runner.batch.max_blocks, runner.device, capacity=4)
    steps = _checked(llm)
    params = [SamplingParams(max_tokens=3, temperature=0.5 + i / 40, top_k=i + 1, seed=i) for i in range(40)]
    want = LLM(model, dtype="float32", max_num_seqs=40, kv_cache_memory_bytes=1 << 22).generate(
        [{"prompt_token_ids": p} for p in _prompts(3, 40)], params)
    got = llm.generate([{"prompt_token_ids": p} for p in _prompts(3, 40)], params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]  # columns kept
    assert len(batch._tables) == 64 and len(batch.columns.top_k) == 64  # 4 -> 8 -> ... -> 64
    assert steps[0] > 0 and len(batch) == 40  # released only when the next step names them
    llm.generate([{"prompt_token_ids": p} for p in _prompts(4, 5)], SamplingParams(max_tokens=3, temperature=0))
    assert len(batch) == 5 and max(batch.rows.values()) < 40


def test_final_only_requests_report_once(model):
    llm = LLM(model, dtype="float32", kv_cache_memory_bytes=1 << 22)
    eng = llm.engine
    a = eng.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, temperature=0), final_only=True)
    b = eng.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, temperature=0))
    seen = {a: [], b: []}
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen[out.request_id].append(out)
    assert len(seen[a]) == 1 and seen[a][0].finished and len(seen[b]) == 4
    assert seen[a][0].outputs[0].token_ids == seen[b][-1].outputs[0].token_ids


def test_a_failed_row_leaves_no_values_behind(model):
    """A request whose parameters cannot be stored fails alone; its row holds nothing of it."""
    from tokenmill.engine.input_batch import InputBatch

    batch = InputBatch(4, 8, torch.device("cpu"), capacity=2)
    good = Request("g", None, [1, 2], SamplingParams(temperature=0.3, top_p=0.3), 0.0).seqs[0]
    good.block_table = [1]
    batch.sync(good, 0)
    batch.release([good.seq_id])
    bad = Request("b", None, [1, 2], SamplingParams(temperature=1.0), 0.0).seqs[0]
    bad.block_table = [2]
    bad.request.params.top_p = "x"  # cannot be stored
    with pytest.raises((TypeError, ValueError)):
        batch.sync(bad, 0)
    assert len(batch) == 0
    llm = LLM(model, dtype="float32", kv_cache_memory_bytes=1 << 22)
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, top_k=2**63, temperature=1.0))
    assert len(out[0].outputs[0].token_ids) == 2  # top_k beyond int64: no top-k, as in vLLM


def test_staging_packs_arrays_into_one_buffer():
    arrays = [np.arange(5, dtype=np.int64), np.array([0.5, -1.25, 3.0], np.float32), np.array([True, False]),
              np.arange(12, dtype=np.int64).reshape(3, 4), np.zeros(0, np.int64)]
    st = Staging(torch.device("cpu"))
    st._pack = True  # what a GPU does (the copy to the device aside), here on the CPU
    for _ in range(2):  # the buffer is reused
        out = st(arrays)
        for a, t in zip(arrays, out):
            assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
            assert t.tolist() == a.tolist()
        assert len({t.untyped_storage().data_ptr() for t in out}) == 1  # one buffer
    big = [np.arange(100_000, dtype=np.int64)]
    assert st(big)[0].tolist() == big[0].tolist()  # grows


# -- the sampler's candidate path ------------------------------------------------------------

def _seqs(params: list[SamplingParams]):
    seqs = []
    for i, p in enumerate(params):
        s = Request(str(i), None, [1, 2, 3], p, 0.0).seqs[0]
        s.generator = torch.Generator().manual_seed(1000 + i)
        seqs.append(s)
    return seqs


@pytest.mark.parametrize("kernel", [False, True], ids=["sorted", "kernel"])
def test_candidate_draws_equal_whole_row_draws(kernel, monkeypatch):
    """Rows drawn among their top candidates get the token a draw over the whole masked row gives,
    whichever path each row takes (a nucleus, a min-p floor within the candidates or wider, ties,
    top_k past them), and whether wide rows are sorted or drawn by the GPU's kernel (interpreted
    here)."""
    import tokenmill.sample.sampler as sampler_mod

    if kernel:
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # (a GPU: compiled, it takes CUDA tensors only;
            pytest.skip("test_sampler's cuda cases run the kernel there")  # these rows are the CPU's)
    monkeypatch.setattr(sampler_mod, "WIDE_KERNEL", kernel)
    vocab = 3000
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(1, vocab, generator=g) * 6
    flat = torch.randn(1, vocab, generator=g) * 0.01
    tied = torch.zeros(1, vocab)
    tied[0, :400] = 5.0  # the k-th value ties past the candidates
    kinds = [
        (peaked, dict(top_k=20)), (peaked, dict(top_p=0.9)), (peaked, dict(top_k=40, top_p=0.8)),
        (flat, dict(top_p=0.95)), (flat, dict(top_k=600)), (flat, dict(top_k=600, top_p=0.5)),
        (tied, dict(top_k=50)), (peaked, dict()), (flat, dict(temperature=0.0)), (peaked, dict(top_k=5000)),
        (flat, dict(min_p=0.5)), (peaked, dict(min_p=0.1)), (peaked, dict(min_p=0.05, top_p=0.9)),
        (flat, dict(min_p=0.2, top_k=600)), (peaked, dict(min_p=0.1, top_k=30)), (flat, dict(min_p=0.9, top_p=0.5)),
    ]
    rows, params = [], []
    for rep in range(6):
        for logits, kw in kinds:
            rows.append(logits[0] + 0.001 * rep)
            params.append(SamplingParams(temperature=kw.pop("temperature", 0.7 + 0.1 * rep), seed=rep, **kw))
            kw.pop("seed", None)
    logits = torch.stack(rows)
    got = Sampler()(logits, SamplingMetadata.from_sequences(_seqs(params), vocab, torch.device("cpu"))).token_ids
    # The reference: the whole-row filter, then a draw over the vocabulary with the same uniforms.
    md = SamplingMetadata.from_sequences(_seqs(params), vocab, torch.device("cpu"))
    u = draws(len(rows), md.generators, torch.device("cpu"))
    ref = sample_rows(torch.softmax(Sampler._filter(logits, md), dim=-1), u=u)
    ref = torch.where(md.greedy, logits.argmax(-1), ref).tolist()
    assert got == ref
    assert len(set(got)) > 10


def test_candidate_path_skips_whole_row_work(monkeypatch):
    """A batch whose rows all fit their candidates never sorts a whole row."""
    import tokenmill.sample.sampler as sampler_mod

    def boom(*a, **k):
        raise AssertionError("whole-row sort")

    monkeypatch.setattr(sampler_mod, "_top_k_top_p_sorted", boom)
    topk = torch.Tensor.topk
    widths = []
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, k, *a, **kw: (widths.append(k), topk(self, k, *a, **kw))[1])
    logits = torch.randn(12, 5000) * 6
    params = [SamplingParams(temperature=0.8, top_k=10 + i) if i % 3 == 1
              else SamplingParams(temperature=0.8, top_p=0.5) for i in range(8)]
    params += [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0),  # plain and greedy rows
               SamplingParams(temperature=0.8, top_k=9000), SamplingParams(temperature=0.8, top_k=-1),  # no top-k
               SamplingParams(temperature=0.8, top_k=20)]  # a grammar allowing fewer tokens than top_k
    logits = torch.cat([logits, torch.full((1, 5000), float("-inf"))])
    logits[12, 100:110] = torch.randn(10)
    out = Sampler()(logits, SamplingMetadata.from_sequences(_seqs(params), 5000, torch.device("cpu")))
    assert len(out.token_ids) == 13 and 100 <= out.token_ids[12] < 110
    assert widths == [256]  # candidates only: a top_k past the vocabulary does not widen them


def test_a_replaced_table_is_synced_whole():
    """A table the block manager replaces (a new list) is copied whole even without a free in between;
    one grown in place is copied from the chunk's first block on."""
    from tokenmill.engine.input_batch import InputBatch

    seq = Request("r", None, list(range(40)), SamplingParams(), 0.0).seqs[0]
    batch = InputBatch(block_size=4, max_blocks=16, device=torch.device("cpu"), capacity=2)
    seq.block_table = [7, 8, 9]
    row = batch.sync(seq, 0)
    assert batch.block_table[row, :4].tolist() == [7, 8, 9, 0]
    seq.block_table.append(10)  # grown in place: a chunk from position 12 (block 3)
    assert batch.sync(seq, 12) == row and batch.block_table[row, :4].tolist() == [7, 8, 9, 10]
    seq.block_table[3] = 11  # copy-on-write of the block a chunk from position 13 writes into
    batch.sync(seq, 13)
    assert batch.block_table[row, :4].tolist() == [7, 8, 9, 11]
    seq.block_table = [1, 2]  # replaced
    batch.sync(seq, 0)
    assert batch.block_table[row, :4].tolist() == [1, 2, 0, 0]
    batch.release([seq.seq_id])
    assert len(batch) == 0 and not batch.block_table.any()
