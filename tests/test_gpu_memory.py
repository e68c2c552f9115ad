"""Sizing the KV cache on a GPU (issue 16): gpu_memory_utilization is a share of the device's total
memory, less what a profiling step measures the engine needs besides the cache. The step itself
runs on any device; the measurement needs CUDA."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenmill import LLM  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # k and v, 2 layers, 16 tokens, 2 KV heads of 16, float32 (tests/models.py)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_profiling_step_runs_the_largest_step_on_a_cache_of_its_own(model_dir, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    llm = LLM(model_dir, attention_backend=backend, device=DEVICE.type, dtype="float32", max_model_len=40,
              max_num_batched_tokens=81, max_num_seqs=8, kv_cache_memory_bytes=64 * BLOCK_BYTES)
    runner = llm.engine.runner
    before = [c.clone() for c in runner.kv_caches]
    runner.profile_step()
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches))
    # 81 tokens in sequences of at most max_model_len: 40, 40 and a single row (3 + 3 + 1 blocks)
    assert runner._profile_kv_bytes == 7 * BLOCK_BYTES
    if DEVICE.type == "cuda":
        used = runner.profile_memory()
        assert runner.weight_bytes < used < torch.cuda.mem_get_info()[1]
