"""AsyncEngine: the engine thread and the event loop; nobody waits forever, nothing leaks."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.server.async_engine import AsyncEngine, EngineStoppedError


@pytest.fixture
def engine(model_dir):
    return LLMEngine(EngineConfig(model=model_dir, kv_cache_memory_bytes=4 * 2**20, seed=0))


def _prompt(engine: LLMEngine, text: str = "Hello world") -> dict:
    return {"prompt": text, "prompt_token_ids": engine.tokenizer.encode(text)}


def test_streams_and_abort_on_close(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start(asyncio.get_running_loop())
        try:
            outs = [o async for o in ae.generate("a", _prompt(engine), SamplingParams(max_tokens=5, temperature=0))]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
            # Stop reading after the first output: the request is aborted and its blocks freed.
            gen = ae.generate("b", _prompt(engine), SamplingParams(max_tokens=500, ignore_eos=True))
            first = await gen.__anext__()
            assert not first.finished
            await gen.aclose()
            for _ in range(200):
                if ae.stats.kv_cache_usage_perc == 0 and ae.stats.num_requests_running == 0:
                    break
                await asyncio.sleep(0.01)
            assert ae.stats.kv_cache_usage_perc == 0
            assert ae.num_in_flight == 0
        finally:
            await asyncio.to_thread(ae.stop)
        assert not engine.requests and not engine._seq_by_id

    asyncio.run(main())


def test_requests_after_stop_are_refused(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start(asyncio.get_running_loop())
        await asyncio.to_thread(ae.stop)
        with pytest.raises(EngineStoppedError):
            await ae.add_requests([("x", _prompt(engine), SamplingParams(max_tokens=2))])

    asyncio.run(main())


def test_engine_thread_death_fails_waiting_and_running_requests(engine):
    """If the engine thread dies outside a step, queued adds are refused and running streams end
    with an error: nobody waits forever."""
    calls = {"n": 0}
    stats = engine.stats

    def dying_stats():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return stats()

    engine.stats = dying_stats

    async def main():
        ae = AsyncEngine(engine)
        ae.start(asyncio.get_running_loop())
        errors = []

        async def one(rid: str):
            try:
                async for out in ae.generate(rid, _prompt(engine), SamplingParams(max_tokens=300, ignore_eos=True)):
                    if out.error:
                        errors.append(out.error)
            except EngineStoppedError as e:
                errors.append(str(e))

        await asyncio.wait_for(asyncio.gather(one("a"), one("b"), one("c")), timeout=30)
        assert len(errors) == 3
        assert not ae.is_running

    asyncio.run(main())


def test_a_slow_reader_holds_only_the_newest_snapshot(engine):
    """Outputs are full snapshots: one not read yet is replaced by the next, so a reader that
    falls behind costs O(length) memory, not a backlog of every step's snapshot."""
    async def main():
        ae = AsyncEngine(engine)
        ae.start(asyncio.get_running_loop())
        try:
            group = await ae.add_requests([("slow", _prompt(engine), SamplingParams(max_tokens=40, ignore_eos=True))])
            most_unread = 0
            for _ in range(2000):  # do not read until the request is done; just watch the group
                most_unread = max(most_unread, group.num_unread)
                if engine.has_unfinished_requests() is False and group.num_unread:
                    break
                await asyncio.sleep(0.005)
            assert most_unread == 1
            (out,) = await group.get()
            assert out.finished and len(out.outputs[0].token_ids) == 40
            assert not group.pending
        finally:
            ae.release(group)
            await asyncio.to_thread(ae.stop)

    asyncio.run(main())


def test_an_unread_final_output_is_never_replaced():
    from tokenmill.outputs import RequestOutput
    from tokenmill.server.async_engine import RequestGroup

    async def main():
        group = RequestGroup(["a"])
        group.put(RequestOutput("a", None, [], None, [], finished=False))
        group.put(RequestOutput("a", None, [], None, [], finished=True))
        group.put(RequestOutput("a", None, [], None, [], finished=True, error="engine stopped"))
        (out,) = await group.get()
        assert out.finished and out.error is None and not group.pending

    asyncio.run(main())
