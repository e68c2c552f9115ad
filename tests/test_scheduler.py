"""Block manager and scheduler as plain bookkeeping, driven without a model.

The state machine interleaves add / step / abort at random with a cache small enough that
preemption happens; after every action, reference counts must equal the live block
tables exactly, and at the end every request is finished or aborted with all blocks free.
"""

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request, SeqStatus
from tokenmill.sampling_params import SamplingParams

BLOCK = 4


def _request(rid: str, prompt_len: int, max_tokens: int, priority: int = 0, n: int = 1) -> Request:
    return Request(rid, None, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, n=n), float(rid),
                   priority)


def _fake_step(sched: Scheduler) -> list:
    """What the engine does after the runner: advance, append a token, finish at max_tokens."""
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    for s in out.scheduled:
        assert s.num_new_tokens > 0
        assert s.seq.status is SeqStatus.RUNNING
        # blocks cover every token that will be in the cache after this step
        assert len(s.seq.block_table) * BLOCK >= s.start + s.num_new_tokens
    sched.advance(out)
    finished = []
    for s in out.scheduled:
        seq = s.seq
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq)
                finished.append(seq)
    return finished


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # 24 blocks of 4 tokens: one request of up to 96 tokens always fits on its own.
        self.bm = BlockManager(24, BLOCK)
        self.sched = Scheduler(self.bm, max_num_seqs=6, max_num_batched_tokens=20)
        self.requests: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.next_id = 0

    def live(self):
        return [s for r in self.requests.values() for s in r.seqs if not s.is_finished]

    @rule(prompt_len=st.integers(1, 60), max_tokens=st.integers(1, 30), priority=st.integers(0, 2),
          n=st.integers(1, 2))
    def add(self, prompt_len, max_tokens, priority, n):
        rid = str(self.next_id)
        self.next_id += 1
        req = _request(rid, prompt_len, max_tokens, priority, n)
        self.requests[rid] = req
        for seq in req.seqs:
            self.sched.add(seq)

    @rule()
    def step(self):
        _fake_step(self.sched)

    @precondition(lambda self: any(not r.is_finished for r in self.requests.values()))
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(r for r, q in self.requests.items() if not q.is_finished)))
        for seq in self.requests[rid].seqs:
            if not seq.is_finished:
                self.sched.finish(seq)
        self.aborted.add(rid)

    @invariant()
    def blocks_consistent(self):
        self.bm.check_invariants(self.live())
        assert self.sched.num_unfinished == len(self.live())

    def teardown(self):
        for _ in range(10_000):
            if not self.sched.has_unfinished():
                break
            _fake_step(self.sched)
        assert not self.sched.has_unfinished(), "some request never finished"
        for rid, req in self.requests.items():
            assert req.is_finished
            if rid not in self.aborted:
                assert all(s.num_output_tokens == s.params.max_tokens for s in req.seqs)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(c == 0 for c in self.bm.ref_counts)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_preemption_happens_and_is_recompute():
    bm = BlockManager(10, BLOCK)  # 40 tokens
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [_request(str(i), 12, 20) for i in range(3)]
    for r in reqs:
        sched.add(r.seqs[0])
    preempted = []
    for _ in range(200):
        out = sched.schedule()
        preempted += out.preempted
        for seq in out.preempted:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            assert seq.status is SeqStatus.WAITING
        sched.advance(out)
        for s in out.scheduled:
            seq = s.seq
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(1)
                if seq.num_output_tokens == 20:
                    sched.finish(seq)
        if not sched.has_unfinished():
            break
    assert preempted, "three 32-token sequences cannot share 40 tokens of cache"
    # FCFS: the latest arrival is the victim
    assert preempted[0].request.request_id == "2"
    assert all(r.seqs[0].num_output_tokens == 20 for r in reqs)
    assert bm.num_free_blocks == 10


def test_chunked_prefill_shares_budget_with_decodes():
    bm = BlockManager(100, BLOCK)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    a = _request("0", 5, 10)
    sched.add(a.seqs[0])
    _fake_step(sched)  # a's prompt done, first token sampled
    b = _request("1", 50, 10)
    sched.add(b.seqs[0])
    out = sched.schedule()
    sizes = {s.seq.request.request_id: s.num_new_tokens for s in out.scheduled}
    assert sizes == {"0": 1, "1": 15}  # a decodes, b gets the rest of the budget as a chunk
    assert not any(s.completes for s in out.scheduled if s.seq is b.seqs[0])


def test_priority_orders_admission_and_preemption():
    bm = BlockManager(100, BLOCK)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    low = _request("0", 4, 3, priority=5)
    high = _request("1", 4, 3, priority=-1)
    sched.add(low.seqs[0])
    sched.add(high.seqs[0])
    out = sched.schedule()
    assert [s.seq.request.request_id for s in out.scheduled] == ["1"]


def test_abort_waiting_and_running_frees_blocks():
    bm = BlockManager(20, BLOCK)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    r0, r1 = _request("0", 10, 5), _request("1", 10, 5)
    sched.add(r0.seqs[0])
    sched.add(r1.seqs[0])
    _fake_step(sched)
    assert r0.seqs[0].status is SeqStatus.RUNNING and r1.seqs[0].status is SeqStatus.WAITING
    sched.finish(r1.seqs[0])
    sched.finish(r0.seqs[0])
    assert bm.num_free_blocks == 20 and not sched.has_unfinished()


def test_fork_shares_blocks_by_reference():
    bm = BlockManager(8, BLOCK)
    parent = _request("0", 10, 1).seqs[0]
    child = _request("1", 10, 1).seqs[0]
    assert bm.allocate(parent, 10)
    bm.fork(parent, child)
    assert bm.num_free_blocks == 5
    bm.free(parent)
    assert bm.num_free_blocks == 5
    bm.free(child)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_double_free_is_detected():
    bm = BlockManager(4, BLOCK)
    seq = _request("0", 4, 1).seqs[0]
    bm.allocate(seq, 4)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(seq)


def test_random_long_run_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(30, BLOCK)
    sched = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=24)
    reqs = []
    for i in range(300):
        if rng.random() < 0.3:
            r = _request(str(i), rng.randint(1, 80), rng.randint(1, 40), rng.randint(0, 3))
            reqs.append(r)
            sched.add(r.seqs[0])
        if rng.random() < 0.05 and reqs:
            victim = rng.choice(reqs).seqs[0]
            if not victim.is_finished:
                sched.finish(victim)
        _fake_step(sched)
        bm.check_invariants([r.seqs[0] for r in reqs if not r.seqs[0].is_finished])
    while sched.has_unfinished():
        _fake_step(sched)
    assert bm.num_free_blocks == 30


def test_a_waiting_sequence_whose_pending_token_ends_it_is_not_admitted():
    """Async scheduling: a sequence preempted while a token it sampled is still pending, that token
    reaching max_tokens, finishes once the token is processed; admitting it again would recompute
    its prefix for a row whose token is dropped. One whose pending token does not end it is admitted."""
    for max_tokens, admitted in ((3, False), (4, True)):
        bm = BlockManager(10, BLOCK)
        sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
        req = _request("0", 6, max_tokens)
        seq = req.seqs[0]
        seq.token_ids += [7, 7]  # two outputs, a third pending
        seq.num_pending = 1
        sched.add(seq)
        out = sched.schedule()
        assert bool(out.scheduled) is admitted
        assert (seq.status is SeqStatus.RUNNING) is admitted
