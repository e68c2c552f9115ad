"""Async scheduling (LLMEngine._step_async): step N+1 is scheduled and launched before step N's
tokens reach the host, its pending inputs read from N's tokens on the device.

On a CPU a step runs as it is launched, so nothing overlaps here, but every piece of the logic
runs (async_scheduling="on"): pending tokens, inputs filled on the device, the extra row of a
sequence that N finished, deferred block hashing, the sync fallback. The tokens must be those of
synchronous steps, whatever the workload.
"""

from __future__ import annotations

import random
import re

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.structured import StructuredOutputsParams

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # k and v, 2 layers, 16 tokens, 2 KV heads of 16, float32 (tests/models.py)


def _engine(model_dir: str, mode: str, **kw) -> LLMEngine:
    args = dict(model=model_dir, dtype="float32", async_scheduling=mode, max_model_len=160, max_num_seqs=6,
                max_num_batched_tokens=40, kv_cache_memory_bytes=18 * BLOCK_BYTES, seed=0)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


def _workload(vocab: int) -> list[tuple[int, str, dict, SamplingParams]]:
    """Requests arriving over the steps: greedy and seeded sampling, stop tokens, n > 1 samples,
    penalties, min_tokens, logprobs, prompt logprobs, shared prefixes (prefix cache hits), long
    prompts (chunked prefill) and more than the cache holds (preemptions)."""
    rng = random.Random(1)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.0, stop_token_ids=[rng.randrange(3, vocab) for _ in range(40)]),
        dict(temperature=1.0, top_p=0.9, seed=11),
        dict(temperature=0.8, top_k=20, seed=12, n=2),
        dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
        dict(temperature=1.0, seed=13, min_tokens=6, stop_token_ids=list(range(3, vocab, 2))),
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.0, prompt_logprobs=2),
    ]
    reqs = []
    for i in range(22):
        prompt = ([rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))] if i % 3
                  else shared + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 8))])
        params = SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=True, **kinds[i % len(kinds)])
        reqs.append((rng.randint(0, 40), f"r{i}", {"prompt_token_ids": prompt}, params))
    return sorted(reqs, key=lambda r: r[0])


def _run(eng: LLMEngine, reqs: list) -> tuple[dict, int]:
    pending = list(reqs)
    outs: dict[str, object] = {}
    step = 0
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            eng.add_request(prompt, params, request_id=rid)
        for o in eng.step():
            if o.finished:
                assert o.request_id not in outs
                outs[o.request_id] = o
        step += 1
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not eng.requests and not eng._seq_by_id
    assert eng._inflight is None
    return outs, step


class _Close(float):
    """A logprob equal to another within 1e-4: the two modes batch rows differently, which on a GPU
    moves the last bits (split counts, cuBLAS's choice by row count); rounding both could differ."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and abs(self - other) <= 1e-4

    __hash__ = float.__hash__


def _summary(out) -> list:
    return [(c.token_ids, c.finish_reason, c.stop_reason,
             None if c.logprobs is None else [{t: _Close(lp.logprob) for t, lp in e.items()} for e in c.logprobs])
            for c in out.outputs] + [
        None if out.prompt_logprobs is None else
        [None if e is None else {t: _Close(lp.logprob) for t, lp in e.items()} for e in out.prompt_logprobs]]


def test_async_steps_generate_what_sync_steps_do(model_dir):
    sync = _engine(model_dir, "off")
    reqs = _workload(sync.model_config.vocab_size)
    want, _ = _run(sync, reqs)
    eng = _engine(model_dir, "on")
    assert eng.async_scheduling and not sync.async_scheduling
    got, _ = _run(eng, reqs)
    assert sorted(got) == sorted(want) and len(want) == 22
    for rid in want:
        assert _summary(got[rid]) == _summary(want[rid]), rid
    # The workload reached every case: preemptions, prefix cache hits, stops before max_tokens.
    assert eng.scheduler.num_preemptions > 0 and sync.scheduler.num_preemptions > 0
    assert eng.block_manager.num_hit_tokens > 0
    assert any(o.outputs[0].finish_reason == "stop" for o in got.values())


def test_no_row_for_a_sequence_its_pending_token_ends(model_dir):
    """Sequences that end by length get no row after their last token: async steps schedule
    exactly the tokens synchronous steps do. A stop token ends a sequence the host sees only
    later: that costs one dropped row, never a wrong token."""
    def scheduled(mode: str, **params) -> tuple[int, list]:
        eng = _engine(model_dir, mode, kv_cache_memory_bytes=64 * BLOCK_BYTES)
        tokens = [0]
        schedule = eng.scheduler.schedule

        def counting():
            out = schedule()
            tokens[0] += out.num_batched_tokens
            return out

        eng.scheduler.schedule = counting
        reqs = [(i, f"r{i}", {"prompt_token_ids": [5 + i] * (3 + i)}, SamplingParams(max_tokens=4 + 2 * i, **params))
                for i in range(8)]
        outs, _ = _run(eng, reqs)
        return tokens[0], [outs[r].outputs[0].token_ids for r in sorted(outs)]

    assert scheduled("on", temperature=0.0, ignore_eos=True) == scheduled("off", temperature=0.0, ignore_eos=True)
    # A stop token every sequence meets: one dropped row per sequence stopped early, no more.
    on, on_tokens = scheduled("on", temperature=0.0, stop_token_ids=list(range(512)))
    off, off_tokens = scheduled("off", temperature=0.0, stop_token_ids=list(range(512)))
    assert on_tokens == off_tokens and all(len(t) == 1 for t in on_tokens)
    assert off < on <= off + 8


def test_grammars_and_beams_with_async_steps(model_dir):
    """A grammar's mask for step N+1 is filled after step N's token is consumed; a beam search
    makes the steps run one at a time while it is in the engine, and plain requests beside it
    keep their tokens."""
    prompts = ["Hello world", "The quick brown", "Hi", "Stop here"]

    def run(mode: str) -> list:
        llm = LLM(model_dir, dtype="float32", async_scheduling=mode, kv_cache_memory_bytes=64 * BLOCK_BYTES, seed=0)
        params = [SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=StructuredOutputsParams(
                      regex=r"[0-9]{2}(-[a-z]{2}){3}!")),  # each position's mask differs from the last
                  SamplingParams(temperature=0.9, seed=3, max_tokens=25, structured_outputs=StructuredOutputsParams(
                      choice=["alpha", "beta gamma", "delta"])),
                  SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                  SamplingParams(n=3, use_beam_search=True, max_tokens=8, ignore_eos=True)]
        outs = llm.generate(prompts, params)
        assert llm.engine._inflight is None and not llm.engine._needs_sync()
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        return [[(c.text, c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]

    sync, asyn = run("off"), run("on")
    assert asyn == sync
    assert re.fullmatch(r"[0-9]{2}(-[a-z]{2}){3}!", sync[0][0][0])
    assert sync[1][0][0] in ("alpha", "beta gamma", "delta")


def test_abort_and_park_while_a_step_is_in_flight(model_dir):
    eng = _engine(model_dir, "on", kv_cache_memory_bytes=64 * BLOCK_BYTES)
    ref = _engine(model_dir, "off", kv_cache_memory_bytes=64 * BLOCK_BYTES)
    p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = {}
    for rid in ("a", "b"):
        ref.add_request({"prompt_token_ids": [7, 8, 9, ord(rid)]}, p, rid)
    while ref.has_unfinished_requests():
        for o in ref.step():
            if o.finished:
                want[o.request_id] = o.outputs[0].token_ids
    got = {}
    for rid in ("a", "b", "c"):
        eng.add_request({"prompt_token_ids": [7, 8, 9, ord(rid)]}, p, rid)
    for _ in range(3):
        eng.step()
    assert eng._inflight is not None
    eng.abort_request("c")  # its row in the step in flight is dropped when the step is processed
    assert eng.park() > 0  # finishes the step in flight first: its outputs wait in take_outputs()
    assert eng._inflight is None and eng.parked
    kept = eng.take_outputs()
    assert {o.request_id for o in kept} == {"a", "b"} and not any(o.finished for o in kept)
    eng.unpark()
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.outputs[0].token_ids
    assert got == want
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_configuration():
    cfg = EngineConfig(model="x", async_scheduling="maybe")
    with pytest.raises(ValueError, match="async_scheduling"):
        cfg.validate()
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not EngineConfig(model="x").resolve_async_scheduling(cpu, "generate")
    assert EngineConfig(model="x").resolve_async_scheduling(cuda, "generate")
    assert not EngineConfig(model="x").resolve_async_scheduling(cuda, "embed")
    assert EngineConfig(model="x", async_scheduling="on").resolve_async_scheduling(cpu, "generate")
    spec = EngineConfig(model="x", async_scheduling="on", speculative_config={"method": "ngram",
                                                                              "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="speculative decoding"):
        spec.resolve_async_scheduling(cpu, "generate")
    spec.async_scheduling = "auto"
    assert not spec.resolve_async_scheduling(cuda, "generate")


def test_served_through_the_engine_thread(model_dir):
    """The server's engine thread (AsyncEngine) with async steps: streams end with the tokens of
    synchronous steps, a stream closed early aborts its request, and nothing is left behind."""
    import asyncio

    from tokenmill.server.async_engine import AsyncEngine

    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ref = _engine(model_dir, "off", kv_cache_memory_bytes=64 * BLOCK_BYTES)
    for i, prompt in enumerate(([5, 6, 7], [8, 9])):
        ref.add_request({"prompt_token_ids": prompt}, p, request_id=str(i))
    done = {}
    while ref.has_unfinished_requests():
        for o in ref.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    want = [done["0"], done["1"]]
    eng = _engine(model_dir, "on", kv_cache_memory_bytes=64 * BLOCK_BYTES)

    async def main():
        ae = AsyncEngine(eng)
        ae.start(asyncio.get_running_loop())
        try:
            long = ae.generate("long", {"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=150, ignore_eos=True))
            first = await long.__anext__()
            assert not first.finished
            outs = await asyncio.gather(*[_last(ae.generate(f"r{i}", {"prompt_token_ids": pr}, p))
                                          for i, pr in enumerate(([5, 6, 7], [8, 9]))])
            await long.aclose()  # aborted while its steps are in flight
            for _ in range(200):
                if ae.stats.num_requests_running == 0 and ae.stats.kv_cache_usage_perc == 0:
                    break
                await asyncio.sleep(0.01)
            assert ae.stats.kv_cache_usage_perc == 0
            return [o.outputs[0].token_ids for o in outs]
        finally:
            await asyncio.to_thread(ae.stop)

    assert asyncio.run(main()) == want
    assert not eng.requests and not eng._seq_by_id and eng._inflight is None


async def _last(gen):
    outs = [out async for out in gen]
    return outs[-1]


def test_abort_of_a_prompt_logprobs_request_in_flight(model_dir):
    """A request whose prompt logprobs are still on the device when it is aborted: alone (the
    abort finishes the step in flight) and beside others (the next step does)."""
    eng = _engine(model_dir, "on", kv_cache_memory_bytes=64 * BLOCK_BYTES)
    scored = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2)
    eng.add_request({"prompt_token_ids": list(range(5, 35))}, scored, "alone")
    eng.step()
    assert eng._inflight is not None
    assert eng.abort_request("alone").finished
    assert eng._inflight is None and not eng.has_unfinished_requests()
    eng.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=8), "other")
    eng.add_request({"prompt_token_ids": list(range(5, 35))}, scored, "scored")
    eng.step()
    eng.abort_request("scored")
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert set(done) == {"other"} and len(done["other"].outputs[0].token_ids) == 8
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_a_failed_step_after_one_in_flight_fails_only_its_culprit(model_dir, monkeypatch):
    """Step N+1 fails to launch after step N stopped another request: the rerun one request at a
    time skips the stopped request (its blocks are free, maybe another's by now), and the rest
    keep the tokens they would have had."""
    from tokenmill.engine.model_runner import ModelRunner

    def victim(mode: str, poison: bool) -> tuple[list, dict]:
        eng = _engine(model_dir, mode, kv_cache_memory_bytes=64 * BLOCK_BYTES)
        eng.add_request({"prompt_token_ids": [7] * 20},
                        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=2), "victim")
        eng.step()
        eng.step()
        finished = {}
        if poison:
            eng.add_request({"prompt_token_ids": [9] * 5},
                            SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=list(range(512))), "x")
            eng.add_request({"prompt_token_ids": [11] * 5}, SamplingParams(max_tokens=9, seed=666), "y")
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    finished[o.request_id] = o
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        return _summary(finished["victim"]), finished

    launch = ModelRunner.launch

    def faulty(self, sched, *args, **kwargs):
        if any(s.seq.params.seed == 666 and s.seq.num_tokens > 5 for s in sched.scheduled):
            raise RuntimeError("injected fault")  # y's first decode, the step after x's last token
        return launch(self, sched, *args, **kwargs)

    want, _ = victim("off", False)
    monkeypatch.setattr(ModelRunner, "launch", faulty)
    got, finished = victim("on", True)
    assert got == want
    assert finished["x"].outputs[0].finish_reason == "stop" and len(finished["x"].outputs[0].token_ids) == 1
    assert finished["y"].outputs[0].finish_reason == "error"


def test_engines_taking_turns_on_a_device_leave_no_step_in_flight(model_dir):
    """Two engines on one DeviceLoop (a model pool): while both have work, each step is processed
    before the other engine's (a step in flight would hold the other's work in its energy interval);
    alone, an engine overlaps again. Tokens are those of synchronous steps."""
    import asyncio

    from tokenmill.server.async_engine import AsyncEngine, DeviceLoop

    p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ref = _engine(model_dir, "off", kv_cache_memory_bytes=64 * BLOCK_BYTES)
    want = {}
    for rid, prompt, params in (("a", [5, 6, 7], p), ("b", [8, 9], short)):
        ref.add_request({"prompt_token_ids": prompt}, params, request_id=rid)
    while ref.has_unfinished_requests():
        for o in ref.step():
            if o.finished:
                want[o.request_id] = o.outputs[0].token_ids
    engines = {name: _engine(model_dir, "on", kv_cache_memory_bytes=64 * BLOCK_BYTES) for name in "ab"}
    seen = []
    for name, eng in engines.items():
        def step(orig=eng.step, eng=eng, name=name):
            out = orig()
            seen.append((name, eng.shares_device, eng._inflight is not None))
            return out
        eng.step = step

    async def main():
        loop = DeviceLoop()
        fronts = {name: AsyncEngine(eng) for name, eng in engines.items()}
        for f in fronts.values():
            loop.attach(f)
            f.start(asyncio.get_running_loop())
        loop.start()
        try:
            outs = await asyncio.gather(_last(fronts["a"].generate("a", {"prompt_token_ids": [5, 6, 7]}, p)),
                                        _last(fronts["b"].generate("b", {"prompt_token_ids": [8, 9]}, short)))
            return {o.request_id: o.outputs[0].token_ids for o in outs}
        finally:
            await asyncio.to_thread(loop.stop)

    assert asyncio.run(main()) == want
    shared = [s for s in seen if s[1]]
    assert shared and not any(inflight for _, _, inflight in shared)  # both busy: nothing left in flight
    assert any(name == "a" and not sh and inflight for name, sh, inflight in seen)  # a alone: overlapping
    assert all(e._inflight is None and not e.requests for e in engines.values())
