"""Weights and the KV cache in one huge-page region each (tokenmill/memory.py)."""

import torch

from tests.models import make_model
from tokenmill import LLM
from tokenmill.memory import pack_parameters


def test_pack_parameters_keeps_values_in_order_and_aligned():
    ts = [torch.randn(3, 5), torch.arange(7, dtype=torch.int8), torch.randn(4, dtype=torch.bfloat16), torch.ones(1)]
    params = [torch.nn.Parameter(t.clone(), requires_grad=False) for t in ts]
    pack_parameters(params)
    out = [p.data for p in params]
    for a, b in zip(ts, out):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape and b.is_contiguous()
        assert b.data_ptr() % 64 == 0
    ptrs = [b.data_ptr() for b in out]
    assert ptrs == sorted(ptrs) and ptrs[-1] - ptrs[0] < 4096  # laid end to end
    out[0].add_(1)  # views own writable memory, apart from the originals
    assert torch.equal(out[0], ts[0] + 1)


def test_model_weights_and_kv_cache_are_packed(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    llm = LLM(path, max_model_len=64, kv_cache_memory_bytes=2**20, quantization="int8")
    runner = llm.engine.runner
    params = list(runner.model.parameters())
    nbytes = [p.numel() * p.element_size() for p in params]
    span = max(p.data_ptr() + n for p, n in zip(params, nbytes)) - min(p.data_ptr() for p in params)
    assert span < sum(nbytes) + 64 * len(params)  # one region
    caches = runner.kv_caches
    assert all(c.is_contiguous() and not c.any() for c in caches)
    assert caches[1].data_ptr() - caches[0].data_ptr() == caches[0].numel() * caches[0].element_size()
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, None)
    assert len(out[0].outputs[0].token_ids) > 0


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_release_pages_frees_memory_and_pages_come_back_zeroed():
    from tokenmill.memory import host_arena, release_pages

    arena = host_arena(64 << 20)
    arena.fill_(7)
    before = _rss_bytes()
    view = arena[100:]  # a view that starts mid-page: the partial page is zeroed by hand
    release_pages(view)
    assert before - _rss_bytes() > 48 << 20  # the pages went back to the kernel
    assert torch.equal(arena[:100], torch.full((100,), 7, dtype=torch.uint8))
    assert int(view.count_nonzero()) == 0
    view.fill_(3)  # and they are writable memory again
    assert int(arena[100:].eq(3).sum()) == arena.numel() - 100


def test_park_and_unpark_mid_generation_changes_nothing(tmp_path):
    """A parked engine (the model pool's swap) frees its KV cache; its running sequences are
    preempted and resume unchanged once it is back, with the weights offloaded too or not."""
    from tokenmill import SamplingParams

    path = make_model(str(tmp_path / "m"), "llama")
    llm = LLM(path, kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=64)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    prompts = [[1 + i, 5, 7, 9, 11 + i] * (1 + i) for i in range(4)]
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    want_seeded = llm.generate([{"prompt_token_ids": prompts[0]}], seeded)[0].outputs[0].token_ids
    for offload in (False, True):
        for i, p in enumerate(prompts):
            engine.add_request({"prompt_token_ids": p}, params, request_id=f"g{i}")
        engine.add_request({"prompt_token_ids": prompts[0]}, seeded, request_id="s")
        done, steps = {}, 0
        while engine.has_unfinished_requests():
            if steps in (2, 9, 30):  # mid-prefill, then mid-decode
                assert engine.park(offload_weights=offload) > 0 and engine.parked
                assert engine.block_manager.num_used_blocks == 0
                engine.add_request({"prompt_token_ids": [3, 4]}, params, request_id=f"late{steps}")
                engine.abort_request(f"late{steps}")  # requests come and go while it is parked
                engine.unpark()
                assert not engine.parked and not engine.runner.weights_offloaded
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            steps += 1
        assert [done[f"g{i}"] for i in range(4)] == want
        assert done["s"] == want_seeded
        assert engine.block_manager.num_used_blocks == 0


def test_a_draft_models_kv_cache_is_kept_mapped_while_parked(tmp_path):
    """On CPU a parked model's draft KV cache gives its pages back and keeps its mapping, as the
    model's own does: coming back allocates nothing (it zero-filled the whole draft cache before),
    and the drafts, hence the outputs, are unchanged."""
    from tokenmill import SamplingParams

    path = make_model(str(tmp_path / "m"), "llama")
    draft = make_model(str(tmp_path / "d"), "llama", seed=1)
    llm = LLM(path, kv_cache_memory_bytes=8 * 2**20, speculative_config={"model": draft, "num_speculative_tokens": 3})
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": [5, 6, 7, 5, 6, 7]}, params)[0].outputs[0].token_ids
    d = llm.engine.runner.drafter
    ptrs = [c.data_ptr() for c in d.kv_caches]
    llm.engine.park()
    assert [c.data_ptr() for c in d.kv_caches] == ptrs and not any(int(c.count_nonzero()) for c in d.kv_caches)
    llm.engine.unpark()
    assert [c.data_ptr() for c in d.kv_caches] == ptrs
    assert llm.generate({"prompt_token_ids": [5, 6, 7, 5, 6, 7]}, params)[0].outputs[0].token_ids == want
