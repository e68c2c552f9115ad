"""Greedy outputs and logits against Hugging Face transformers on the same weights (float32, CPU)."""

import pytest
import torch

from tests.models import ARCH_CONFIGS, VOCAB, hf_greedy, hf_model, make_model
from tokenmill import LLM, SamplingParams
from tokenmill.engine.scheduler import ScheduledSeq, SchedulerOutput
from tokenmill.engine.sequence import Request

PROMPT_LENS = [1, 2, 3, 5, 8, 13, 17, 31, 47, 64, 100, 150, 211, 300, 420, 500]
MAX_TOKENS = 24


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_greedy_matches_transformers_with_chunking_and_preemption(tmp_path, arch):
    shard = "60KB" if arch == "llama" else None  # also exercises a sharded checkpoint
    path = make_model(str(tmp_path / arch), arch, shard=shard)
    prompts = _prompts(sorted(ARCH_CONFIGS).index(arch))
    # 40 blocks of 16 tokens hold one 640-token sequence but not 16 prompts at once: forces preemption.
    llm = LLM(path, max_model_len=640, max_num_batched_tokens=48, block_size=16, max_num_seqs=16)
    per_block = llm.engine.runner.kv_bytes_per_block
    llm = LLM(path, max_model_len=640, max_num_batched_tokens=48, block_size=16, max_num_seqs=16,
              kv_cache_memory_bytes=44 * per_block)
    assert llm.engine.block_manager.num_blocks == 44
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert llm.engine.scheduler.num_preemptions > 0, "the KV budget should have forced preemption"

    ref_model = hf_model(path)
    for p, out in zip(prompts, outs):
        ref = hf_greedy(ref_model, p, MAX_TOKENS)
        assert out.outputs[0].token_ids == ref, f"prompt of {len(p)} tokens diverged"
        assert out.prompt_token_ids == p
    # Nothing leaked.
    assert llm.engine.block_manager.num_free_blocks == 44
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_full_prompt_logits_match_transformers(tmp_path, arch):
    path = make_model(str(tmp_path / arch), arch)
    llm = LLM(path, max_model_len=640, kv_cache_memory_bytes=4 * 2**20)
    engine = llm.engine
    prompt = _prompts(7)[-1]  # 500 tokens
    req = Request("x", None, prompt, SamplingParams(max_tokens=1), 0.0)
    seq = req.seqs[0]
    logits = []
    start, chunk = 0, 96  # chunked, so later chunks read earlier context from the paged cache
    while start < len(prompt):
        n = min(chunk, len(prompt) - start)
        assert engine.block_manager.allocate(seq, n)
        inp = engine.runner.prepare(SchedulerOutput([ScheduledSeq(seq, n, start)]))
        hidden = engine.runner.forward(inp)
        logits.append(engine.runner.model.compute_logits(hidden))
        start += n
        seq.num_computed_tokens = start
    ours = torch.cat(logits)
    engine.block_manager.free(seq)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours.cpu(), ref, atol=1e-4, rtol=0)


def test_mixed_decode_and_prefill_batches_match_single_runs(tmp_path):
    """Requests submitted together (decodes and prefill chunks in one batch) equal each run alone."""
    path = make_model(str(tmp_path / "m"), "qwen2")
    llm = LLM(path, max_model_len=640, max_num_batched_tokens=40, kv_cache_memory_bytes=4 * 2**20)
    prompts = _prompts(3)[::3]
    sp = SamplingParams(max_tokens=12, temperature=0)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    for p, out in zip(prompts, together):
        alone = llm.generate({"prompt_token_ids": p}, sp)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
