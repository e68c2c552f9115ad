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
