"""A generation resumed on another engine (a fleet router's failover): the tokens already made are
handed over, and the rest equals what the first engine would have produced."""

from __future__ import annotations

import pytest

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import StructuredOutputsParams


def finish(engine: LLMEngine, rid: str):
    """The request's final output, stepping the engine until it has it."""
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out


def run(engine: LLMEngine, prompt: dict, params: SamplingParams) -> list[int]:
    return finish(engine, engine.add_request(prompt, params)).outputs[0].token_ids


@pytest.fixture(scope="module")
def engine(llm):
    return llm.engine


PROMPT = {"prompt_token_ids": [1, 17, 99, 4, 250, 31, 8, 77, 5, 123]}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True, repetition_penalty=1.3, logprobs=2),
], ids=["greedy", "seeded", "seeded-penalty-logprobs"])
@pytest.mark.parametrize("cut", [1, 13, 39])
def test_resumed_generation_equals_undisturbed(engine, params, cut):
    full = run(engine, PROMPT, params)
    assert len(full) == 40
    rest = run(engine, {**PROMPT, "resume_token_ids": full[:cut]}, params)
    assert rest == full


def test_resume_with_a_constraint_and_a_stop_string(engine):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=30,
                            structured_outputs=StructuredOutputsParams(regex="[a-z ]{5,60}"))
    full = run(engine, PROMPT, params)
    assert len(full) > 4
    assert run(engine, {**PROMPT, "resume_token_ids": full[:4]}, params) == full


def test_resume_refused_cleanly(engine):
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    full = run(engine, PROMPT, p)
    for bad, msg in [(full, "nothing to generate"), ([10**9], "outside the vocabulary")]:
        with pytest.raises(ValueError, match=msg):
            engine.add_request({**PROMPT, "resume_token_ids": bad}, p)
    with pytest.raises(ValueError, match="n=1"):
        engine.add_request({**PROMPT, "resume_token_ids": full[:2]}, SamplingParams(n=2, max_tokens=8))
    assert not engine.has_unfinished_requests()
    engine.block_manager.check_invariants([])


def test_cached_tokens_never_exceed_the_prompt_after_a_resume(engine):
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = run(engine, PROMPT, p)
    out = finish(engine, engine.add_request({**PROMPT, "resume_token_ids": full[:30]}, p))
    assert out.outputs[0].token_ids == full
    assert out.num_cached_tokens <= len(PROMPT["prompt_token_ids"])  # usage's cached_tokens: prompt tokens only


def test_a_resumed_request_counts_only_the_tokens_generated_here(engine):
    """The handed-over tokens are outputs (usage counts them) but not this engine's generated tokens:
    num_generated_tokens, and with it TPOT and the server's generation_tokens_total, leave them out."""
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = run(engine, PROMPT, p)
    out = finish(engine, engine.add_request({**PROMPT, "resume_token_ids": full[:30]}, p))
    assert len(out.outputs[0].token_ids) == 40
    assert (out.metrics.num_resumed_tokens, out.metrics.num_generated_tokens) == (30, 10)
