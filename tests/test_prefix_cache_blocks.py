"""Prefix caching in the block manager and scheduler, as plain bookkeeping (no model).

The state machine keeps a fake KV cache beside the real bookkeeping: every slot a step
writes records the exact token prefix whose KV it would hold, and every slot a step reads
(the context before its chunk) must hold the prefix the reader expects. So a cache hit that
returns the wrong block, a copy-on-write that is missing, or a write into a block another
sequence reads is caught at the step where it happens, with sharing, hits, eviction,
preemption, forks of n samples and aborts interleaved at random.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenmill.engine.block_manager import BlockManager, block_hashes, hash_block
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request, SeqStatus
from tokenmill.sampling_params import SamplingParams

BLOCK = 4


def _request(rid: str, prompt: list[int], max_tokens: int, n: int = 1, salt: str | None = None,
             priority: int = 0) -> Request:
    return Request(rid, None, list(prompt), SamplingParams(max_tokens=max_tokens, n=n), float(len(rid)), priority,
                   cache_salt=salt)


def _next_token(seq) -> int:
    # Depends on the sample index and position only: equal prompts continue alike (so decode
    # blocks get hits too), while the n samples of one request diverge.
    return (seq.num_tokens * 7 + seq.index * 13) % 50


class FakeKV:
    def __init__(self, num_blocks: int, block: int = BLOCK) -> None:
        self.block = block
        self.slots: list[list[tuple[int, ...] | None]] = [[None] * block for _ in range(num_blocks)]

    def step(self, sched: Scheduler) -> list:
        """One engine step against the fake cache: copies, reads checked, writes, advance, tokens."""
        bm = sched.block_manager
        bs = self.block
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        for src, dst in out.block_copies:
            assert bm.ref_counts[dst] == 1
            self.slots[dst] = list(self.slots[src])
        for s in out.scheduled:
            seq = s.seq
            assert s.num_new_tokens > 0 and seq.status is SeqStatus.RUNNING
            assert len(seq.block_table) * bs >= s.start + s.num_new_tokens
            for p in range(s.start):  # the context this chunk attends to
                got = self.slots[seq.block_table[p // bs]][p % bs]
                assert got == tuple(seq.token_ids[: p + 1]), f"{seq!r} reads wrong KV at position {p}"
            for p in range(s.start, s.start + s.num_new_tokens):
                block = seq.block_table[p // bs]
                assert bm.ref_counts[block] == 1, f"{seq!r} writes into shared block {block}"
                self.slots[block][p % bs] = tuple(seq.token_ids[: p + 1])
        sched.advance(out)
        finished = []
        for s in out.scheduled:
            for seq in [s.seq, *s.forks]:
                if seq.num_computed_tokens == seq.num_tokens:
                    seq.token_ids.append(_next_token(seq))
                    if seq.num_output_tokens >= seq.params.max_tokens:
                        sched.finish(seq)
                        finished.append(seq)
        assert len(sched.running) <= sched.max_num_seqs
        return finished


PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26], [30, 31, 32, 33, 34]]


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # 20 blocks of 4 tokens: the longest request (34 + 20 tokens) fits alone, several do not.
        self.bm = BlockManager(20, BLOCK)
        self.sched = Scheduler(self.bm, max_num_seqs=4, max_num_batched_tokens=10)
        self.kv = FakeKV(20)
        self.requests: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.next_id = 0
        self.hits_seen = 0

    def live(self):
        return [s for r in self.requests.values() for s in r.seqs if not s.is_finished]

    @rule(prefix=st.integers(0, len(PREFIXES)), suffix=st.lists(st.integers(0, 49), max_size=20),
          max_tokens=st.integers(1, 20), n=st.integers(1, 3), salt=st.sampled_from([None, None, "a"]),
          priority=st.integers(0, 1))
    def add(self, prefix, suffix, max_tokens, n, salt, priority):
        prompt = (PREFIXES[prefix] if prefix < len(PREFIXES) else []) + suffix
        if not prompt:
            prompt = [0]
        rid = "r" * (self.next_id + 1)
        self.next_id += 1
        req = _request(rid, prompt, max_tokens, n, salt, priority)
        self.requests[rid] = req
        self.sched.add_request(req.seqs)

    @rule()
    def step(self):
        before = self.bm.num_hit_tokens
        self.kv.step(self.sched)
        self.hits_seen += self.bm.num_hit_tokens - before

    @precondition(lambda self: any(not r.is_finished for r in self.requests.values()))
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(r for r, q in self.requests.items() if not q.is_finished)))
        for seq in self.requests[rid].seqs:
            if not seq.is_finished:
                self.sched.finish(seq)
        self.aborted.add(rid)

    @rule()
    def reset_cache(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self):
        self.bm.check_invariants(self.live())
        assert self.sched.num_unfinished == len(self.live())

    def teardown(self):
        for _ in range(10_000):
            if not self.sched.has_unfinished():
                break
            self.kv.step(self.sched)
        assert not self.sched.has_unfinished(), "some request never finished"
        for rid, req in self.requests.items():
            assert req.is_finished
            if rid not in self.aborted:
                assert all(s.num_output_tokens == s.params.max_tokens for s in req.seqs)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(c == 0 for c in self.bm.ref_counts)
        self.bm.check_invariants([])


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])


# -- unit tests ---------------------------------------------------------------------------------
def _run(sched: Scheduler, kv: FakeKV, steps: int = 10_000) -> None:
    for _ in range(steps):
        if not sched.has_unfinished():
            return
        kv.step(sched)


def test_hash_chain_depends_on_every_earlier_token_and_the_salt():
    a = block_hashes(list(range(12)), 4)
    b = block_hashes([0, 1, 2, 99] + list(range(4, 12)), 4)
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b))  # one changed token changes every later key
    assert block_hashes(list(range(12)), 4, salt="t1")[2] != a[2]
    assert block_hashes(list(range(12)), 4, salt="t1") != block_hashes(list(range(12)), 4, salt="t2")
    assert block_hashes(list(range(13)), 4) == a  # partial blocks have no key
    assert hash_block(a[0], [4, 5, 6, 7]) == a[1]


def test_three_requests_sharing_a_40_token_prefix_get_32_cached_tokens():
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=512)
    kv = FakeKV(64, block=16)
    prefix = list(range(100, 140))
    reqs = [_request(f"r{'x' * i}", prefix + [i] * 5, 3) for i in range(3)]
    for r in reqs:
        sched.add_request(r.seqs)
        _run(sched, kv)
    assert [r.num_cached_tokens for r in reqs] == [0, 32, 32]
    assert bm.num_hit_tokens == 64 and bm.num_query_tokens == 3 * 45


def test_whole_prompt_cached_still_computes_the_last_token():
    bm = BlockManager(16, BLOCK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    kv = FakeKV(16)
    prompt = list(range(12))  # exactly 3 blocks
    first = _request("a", prompt, 2)
    sched.add_request(first.seqs)
    _run(sched, kv)
    second = _request("bb", prompt, 2)
    sched.add_request(second.seqs)
    out = sched.schedule()
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(8, 4)]  # 2 blocks hit, 4 tokens run
    assert second.num_cached_tokens == 8


def test_salts_never_share_blocks():
    bm = BlockManager(32, BLOCK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    kv = FakeKV(32)
    prompt = list(range(20))
    for rid, salt, want in (("a", "s1", 0), ("bb", "s2", 0), ("ccc", None, 0), ("dddd", "s1", 16),
                            ("eeeee", "s2", 16), ("ffffff", None, 16)):
        req = _request(rid, prompt, 1, salt=salt)
        sched.add_request(req.seqs)
        _run(sched, kv)
        assert req.num_cached_tokens == want, (rid, salt)


def test_lru_eviction_keeps_recent_prefixes_and_evicts_tails_first():
    bm = BlockManager(6, BLOCK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    kv = FakeKV(6)
    a = _request("a", list(range(100, 112)), 1)  # 3 full blocks + the sampled token
    sched.add_request(a.seqs)
    _run(sched, kv)
    assert bm.num_cached_free_blocks == 3 and bm.num_free_blocks == 6
    b = _request("bb", list(range(200, 213)), 1)  # needs 4 blocks: 3 free + evicts a's last block
    sched.add_request(b.seqs)
    _run(sched, kv)
    assert bm.num_evictions == 1
    again = _request("ccc", list(range(100, 112)) + [5], 1)
    sched.add_request(again.seqs)
    _run(sched, kv)
    assert again.num_cached_tokens == 8  # a's first two blocks survived; its tail went first
    bm.check_invariants([])


def test_fork_copies_the_shared_partial_block_before_writing():
    bm = BlockManager(16, BLOCK)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    req = _request("a", list(range(10)), 4, n=3)  # 10 tokens: 2 full blocks + a partial one
    sched.add_request(req.seqs)
    out = sched.schedule()
    assert [s.seq.index for s in out.scheduled] == [0] and len(out.scheduled[0].forks) == 2
    assert out.num_batched_tokens == 10
    sched.advance(out)
    for s in [req.seqs[0], *out.scheduled[0].forks]:
        s.token_ids.append(_next_token(s))
    assert all(s.status is SeqStatus.RUNNING for s in req.seqs)
    assert bm.ref_counts[req.seqs[0].block_table[2]] == 3
    out = sched.schedule()
    assert len(out.block_copies) == 2  # two samples copy, the last writer keeps the block
    tables = [s.block_table for s in req.seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3
    bm.check_invariants(req.seqs)


def test_forks_beyond_max_num_seqs_run_on_their_own():
    bm = BlockManager(32, BLOCK)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    kv = FakeKV(32)
    req = _request("a", list(range(9)), 3, n=4)
    sched.add_request(req.seqs)
    out = kv.step(sched)
    assert not out
    assert len(sched.running) == 2 and len(sched.waiting) == 2
    _run(sched, kv)
    assert all(s.num_output_tokens == 3 for s in req.seqs)
    assert bm.num_free_blocks == 32


def test_abort_of_a_waiting_leader_releases_its_samples():
    bm = BlockManager(32, BLOCK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    req = _request("a", list(range(9)), 3, n=3)
    sched.add_request(req.seqs)
    assert sched.num_unfinished == 3
    for seq in req.seqs:
        sched.finish(seq)
    assert not sched.has_unfinished() and sched.num_unfinished == 0
    bm.check_invariants([])


def test_caching_off_never_hits():
    bm = BlockManager(32, BLOCK, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    kv = FakeKV(32)
    for rid in ("a", "bb"):
        req = _request(rid, list(range(20)), 2)
        sched.add_request(req.seqs)
        _run(sched, kv)
        assert req.num_cached_tokens == 0
    assert bm.num_cached_free_blocks == 0 and bm.num_query_tokens == 0


def test_prompt_logprobs_requests_skip_the_lookup_but_feed_the_cache():
    bm = BlockManager(32, BLOCK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    kv = FakeKV(32)
    prompt = list(range(20))
    first = Request("a", None, prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), 0.0)
    sched.add_request(first.seqs)
    _run(sched, kv)
    second = Request("b", None, prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), 1.0)
    sched.add_request(second.seqs)
    _run(sched, kv)
    third = _request("c", prompt, 1)
    sched.add_request(third.seqs)
    _run(sched, kv)
    assert (first.num_cached_tokens, second.num_cached_tokens, third.num_cached_tokens) == (0, 0, 16)


def test_random_long_run_exercises_hits_eviction_copies_and_preemption():
    import random

    rng = random.Random(1)
    bm = BlockManager(24, BLOCK)
    sched = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=12)
    kv = FakeKV(24)
    reqs: list[Request] = []
    copies = 0
    orig = bm.take_copies

    def counting():
        nonlocal copies
        c = orig()
        copies += len(c)
        return c

    bm.take_copies = counting
    for i in range(400):
        if rng.random() < 0.3:
            prompt = rng.choice(PREFIXES) + [rng.randrange(50) for _ in range(rng.randint(0, 12))]
            r = _request("r" * (i + 1), prompt, rng.randint(1, 12), n=rng.randint(1, 3),
                         salt=rng.choice([None, "a"]))
            reqs.append(r)
            sched.add_request(r.seqs)
        if rng.random() < 0.05 and reqs:
            for seq in rng.choice(reqs).seqs:
                if not seq.is_finished:
                    sched.finish(seq)
        kv.step(sched)
        bm.check_invariants([s for r in reqs for s in r.seqs if not s.is_finished])
    _run(sched, kv)
    assert bm.num_free_blocks == 24
    assert bm.num_hit_tokens > 0 and bm.num_evictions > 0 and copies > 0 and sched.num_preemptions > 0
