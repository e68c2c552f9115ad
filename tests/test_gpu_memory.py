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


def test_the_graphs_memory_is_profiled_at_the_largest_captured_size(model_dir, monkeypatch):
    """profile_graph_step runs a decode of the largest captured batch size through the model and
    the draft model (graph_models; on a GPU their peaks are measured one at a time and added), each
    on a one-block cache of its own (what the graphs' private pools hold,
    counted on a GPU against gpu_memory_utilization), leaving the engine's caches as they were."""
    pytest.importorskip("triton")
    llm = LLM(model_dir, attention_backend="triton", cuda_graphs="on" if DEVICE.type == "cuda" else "padded",
              cuda_graph_sizes=[1, 4, 12], device=DEVICE.type, dtype="float32", max_model_len=40, max_num_seqs=12,
              kv_cache_memory_bytes=64 * BLOCK_BYTES,
              speculative_config={"method": "draft_model", "model": model_dir, "num_speculative_tokens": 2})
    runner = llm.engine.runner
    before = [c.clone() for c in runner.kv_caches + runner.drafter.kv_caches]
    rows = []
    for m in (runner.model, runner.drafter.model):
        forward = m.forward

        def counting(ids, *a, forward=forward, **k):
            rows.append(ids.shape[0])
            return forward(ids, *a, **k)
        monkeypatch.setattr(m, "forward", counting)
    made = [runner.profile_graph_step(m, mc) for m, mc in runner.graph_models()]
    assert rows == [12, 12]
    assert made == [BLOCK_BYTES, BLOCK_BYTES]  # a block per layer, for each model
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches + runner.drafter.kv_caches))
    if DEVICE.type == "cuda":
        used = runner.profile_memory()
        assert runner.weight_bytes < used < torch.cuda.mem_get_info()[1]
