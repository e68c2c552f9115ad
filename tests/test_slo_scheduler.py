"""Scheduling policies (fcfs, priority, slo) on a simulated clock with a known step-time model.

The scheduler and block manager run as plain bookkeeping (as in test_scheduler.py); each step
advances a simulated clock by what the step-time model predicts for it, so TTFT and TPOT are
exact functions of the policy's choices.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from tests.test_scheduler import SchedulerMachine
from tokenmill.bench.slo_sim import Sim as _Sim
from tokenmill.bench.slo_sim import make_request
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import TPOT_BANK, TPOT_HARD, Scheduler
from tokenmill.engine.sequence import Request
from tokenmill.engine.slo import SLOTarget, StepTimeModel
from tokenmill.sampling_params import SamplingParams

BLOCK = 16
# 20 ms a step, 0.2 ms a token, 0.1 ms a sampled row, attention 2 us per 1k token-pairs
COEF = (0.02, 2e-4, 1e-4, 2e-6)


def _req(rid: str, prompt: int, out: int, arrival: float, slo: SLOTarget | None = None,
         priority: int = 0) -> Request:
    return make_request(rid, prompt, out, arrival, slo, priority)


def Sim(policy: str, **kw) -> _Sim:
    """The simulator of `bench slo --simulate`, with this file's step-time model."""
    return _Sim(policy, COEF, **kw)


def test_fcfs_ignores_priority_and_priority_orders_by_it():
    for policy, first in (("fcfs", "early"), ("priority", "urgent")):
        sim = Sim(policy, max_num_seqs=1)
        sim.add(_req("early", 32, 2, arrival=0.0, priority=5))
        sim.add(_req("urgent", 32, 2, arrival=1.0, priority=0))
        sim.run([])
        assert min(sim.first, key=sim.first.get) == first, policy


def test_slo_serves_requests_with_targets_first_by_laxity():
    sim = Sim("slo", max_num_seqs=1)
    sim.add(_req("batch", 64, 2, arrival=0.0))
    sim.add(_req("loose", 64, 2, arrival=0.0, slo=SLOTarget(ttft_s=5.0)))
    sim.add(_req("tight", 64, 2, arrival=0.1, slo=SLOTarget(ttft_s=0.5)))
    # A long prompt with the same deadline as "tight" must start earlier: less laxity.
    sim.add(_req("long", 2000, 2, arrival=0.1, slo=SLOTarget(ttft_s=0.5)))
    sim.run([])
    order = sorted(sim.first, key=sim.first.get)
    assert order == ["long", "tight", "loose", "batch"]


def test_slo_step_is_sized_to_keep_running_tpot_targets():
    """A decode with a 60 ms TPOT target runs while a 4,000-token batch prompt prefills: every
    step stays under the target (margin included), and the prefill still completes."""
    sim = Sim("slo", mnbt=2048)
    tpot = 0.06
    sim.add(_req("chat", 16, 10, arrival=0.0, slo=SLOTarget(ttft_s=1.0, tpot_s=tpot)))
    sim.step()  # the chat request's prefill
    sim.add(_req("batch", 4000, 4, arrival=sim.now))
    while "chat" not in sim.done:
        sim.step()
    assert max(sim.step_times[1:]) <= tpot * TPOT_BANK  # while the chat request decodes
    assert sim.tpot("chat") <= tpot
    assert sim.reqs["batch"].seqs[0].num_computed_tokens > 0  # the prefill went on beside it
    sim.run([])
    assert "batch" in sim.done
    # fcfs gives the batch prompt its whole budget per step and the chat request misses its target.
    fcfs = Sim("fcfs", mnbt=2048)
    fcfs.add(_req("chat", 16, 10, arrival=0.0, slo=SLOTarget(ttft_s=1.0, tpot_s=tpot)))
    fcfs.step()
    fcfs.add(_req("batch", 4000, 4, arrival=fcfs.now))
    fcfs.run([])
    assert fcfs.tpot("chat") > tpot


def test_slo_preempts_best_effort_for_requests_with_targets():
    sim = Sim("slo", max_num_seqs=4)
    for i in range(4):
        sim.add(_req(f"b{i}", 32, 50, arrival=0.0))
    for _ in range(5):
        sim.step()
    assert len(sim.sched.running) == 4
    sim.add(_req("chat", 32, 5, arrival=sim.now, slo=SLOTarget(ttft_s=0.2)))
    out = sim.step()
    assert [s.request.request_id for s in out.preempted] == ["b3"]  # the latest best-effort arrival
    assert any(s.seq.request.request_id == "chat" for s in out.scheduled)
    sim.run([])
    assert sim.ttft("chat") <= 0.2
    assert all(f"b{i}" in sim.done for i in range(4))
    assert sim.bm.num_free_blocks == sim.bm.num_blocks


def test_admission_check_predicts_the_queue():
    sim = Sim("slo", mnbt=256)
    new = _req("x", 256, 4, arrival=0.0, slo=SLOTarget(ttft_s=1.0))
    alone = sim.sched.admission_check(new.seqs[0])
    for i in range(8):
        sim.add(_req(f"q{i}", 256, 4, arrival=0.0, slo=SLOTarget(ttft_s=0.5)))  # ahead of y: less laxity
    queued = sim.sched.admission_check(_req("y", 256, 4, arrival=1.0, slo=SLOTarget(ttft_s=1.0)).seqs[0])
    assert alone == pytest.approx(COEF[0] + 256 * COEF[1] + COEF[2] + COEF[3] * 256 * 128.5 / 1024, rel=0.01)
    assert queued > 8 * alone
    urgent = _req("urgent", 256, 4, arrival=0.0, slo=SLOTarget(ttft_s=0.2))  # it goes ahead of the queue
    assert sim.sched.admission_check(urgent.seqs[0]) == pytest.approx(alone)
    # the prediction is what the simulation then measures (within a step)
    sim.add(_req("y", 256, 4, arrival=0.0, slo=SLOTarget(ttft_s=1.0)))
    sim.run([])
    assert abs(sim.ttft("y") - queued) < 0.1
    assert sim.sched.admission_check(_req("z", 8, 4, arrival=0.0).seqs[0]) is None  # no target


def _workload(seed: int, duration: float, rate: float, ttft: float, tpot: float) -> list[Request]:
    """30% interactive (short prompts, short answers, targets), 70% batch (long ones), Poisson."""
    rng = random.Random(seed)
    t, reqs = 0.0, []
    while t < duration:
        t += rng.expovariate(rate)
        i = len(reqs)
        if rng.random() < 0.3:
            reqs.append(_req(f"i{i}", rng.randint(32, 128), rng.randint(16, 32), t, SLOTarget(ttft, tpot)))
        else:
            reqs.append(_req(f"b{i}", rng.randint(256, 1024), rng.randint(64, 128), t))
    return reqs


def test_overload_interactive_attainment_slo_vs_fcfs():
    """Offered load about twice what the engine can do: slo keeps >= 95% of the interactive
    requests within their targets, fcfs does not, and batch tokens/s lose at most 15%."""
    duration = 60.0
    results = {}
    for policy in ("fcfs", "slo"):
        sim = Sim(policy, max_num_seqs=16, mnbt=512)
        reqs = _workload(1, duration, rate=8.0, ttft=0.5, tpot=0.08)
        sim.run(reqs, until=duration)
        inter = [r.request_id for r in reqs if r.slo is not None and r.arrival_time < duration * 0.8]
        met = [rid for rid in inter if rid in sim.done and sim.ttft(rid) <= 0.5 and sim.tpot(rid) <= 0.08]
        batch_tokens = sum(r.seqs[0].num_output_tokens for r in reqs if r.slo is None)
        results[policy] = (len(met) / len(inter), batch_tokens)
        # the run was overloaded: requests were still queued or running at the end
        assert sim.sched.has_unfinished(), policy
    (fcfs_att, fcfs_batch), (slo_att, slo_batch) = results["fcfs"], results["slo"]
    assert slo_att >= 0.95, results
    assert fcfs_att < 0.5, results
    assert slo_batch >= 0.85 * fcfs_batch, results


class SLOSchedulerMachine(SchedulerMachine):
    """test_scheduler's state machine (random adds, steps, aborts, preemption) under the slo
    policy with random targets: blocks stay consistent and every request still finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.sched = Scheduler(self.bm, max_num_seqs=6, max_num_batched_tokens=20, policy="slo",
                               step_model=StepTimeModel(prior=COEF))

    @rule(prompt_len=st.integers(1, 60), max_tokens=st.integers(1, 30), ttft=st.sampled_from([None, 0.05, 1.0]),
          tpot=st.sampled_from([None, 0.021, 0.1]), n=st.integers(1, 2))
    def add_with_targets(self, prompt_len, max_tokens, ttft, tpot, n):
        rid = str(self.next_id)
        self.next_id += 1
        slo = None if ttft is None and tpot is None else SLOTarget(ttft, tpot)
        req = Request(rid, None, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, n=n),
                      float(rid), 0, slo=slo)
        self.requests[rid] = req
        for seq in req.seqs:  # (as the base machine: its fake step does not sample forked samples)
            self.sched.add(seq)


class FCFSSchedulerMachine(SchedulerMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sched = Scheduler(self.bm, max_num_seqs=6, max_num_batched_tokens=20, policy="fcfs")


for _machine in (SLOSchedulerMachine, FCFSSchedulerMachine):
    _case = _machine.TestCase
    _case.settings = settings(max_examples=100, stateful_step_count=60, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    globals()[f"Test{_machine.__name__}"] = _case
del _case, _machine


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="scheduling_policy"):
        Scheduler(BlockManager(4, BLOCK), 1, 16, policy="edf")


def test_better_priority_best_effort_is_not_preempted_for_nothing():
    """A best-effort sequence with a better priority than a waiting request with targets sorts ahead
    of it: preempting it would only queue it again in front (a preemption every step)."""
    sim = Sim("slo", max_num_seqs=1)
    sim.add(_req("vip", 32, 40, arrival=0.0, priority=-1))
    sim.step()
    sim.add(_req("chat", 16, 4, arrival=sim.now, slo=SLOTarget(ttft_s=0.1)))
    sim.run([])
    assert sim.sched.num_preemptions == 0
    assert sim.first["chat"] > sim.done["vip"] - 1e-9  # it waited for the better priority, as it must


def test_one_sequence_slot_still_serves_best_effort():
    sim = Sim("slo", max_num_seqs=1)
    sim.add(_req("chat", 16, 2, arrival=0.0, slo=SLOTarget(ttft_s=1.0)))
    sim.run([])
    sim.add(_req("batch", 16, 2, arrival=sim.now))
    steps = 0
    while "batch" not in sim.done and steps < 10:
        sim.step()
        steps += 1
    assert "batch" in sim.done, "best effort waited with the only slot free"


def test_best_effort_progresses_under_a_tight_tpot_target():
    """A TPOT target barely above a step's fixed cost: best effort still gets some of every step."""
    sim = Sim("slo")
    sim.add(_req("batch", 16, 30, arrival=0.0))
    for i in range(20):
        sim.add(_req(f"chat{i}", 8, 30, arrival=0.0, slo=SLOTarget(tpot_s=COEF[0] * 1.2)))
    for _ in range(40):
        sim.step()
    assert sim.reqs["batch"].seqs[0].num_output_tokens >= 10


def test_a_tight_request_stops_capping_steps_after_the_window():
    sim = Sim("slo", mnbt=2048)
    sim.add(_req("tight", 8, 2, arrival=0.0, slo=SLOTarget(ttft_s=0.05)))
    sim.run([])
    sim.add(_req("batch", 2000, 2, arrival=sim.now))
    out = sim.step()
    assert out.scheduled[0].num_new_tokens < 500  # the window is open: steps stay short
    sim.now += 11.0  # no request with a target for longer than the window
    sim.add(_req("batch2", 2000, 2, arrival=sim.now))
    out = sim.step()
    assert max(s.num_new_tokens for s in out.scheduled) > 1000


def test_an_urgent_prompt_takes_a_whole_step_within_the_decodes_banked_time():
    """A running decode's steps are held to its TPOT target less the margin; a prompt with a TTFT
    target that would need two such steps gets one longer step instead (one fixed cost, an earlier
    first token), paid from the time the decode banked between the margin and TPOT_HARD."""
    tpot = 0.06
    sim = Sim("slo", mnbt=4096)
    sim.add(_req("chat", 16, 60, arrival=0.0, slo=SLOTarget(tpot_s=tpot)))
    sim.add(_req("batch", 8000, 4, arrival=0.0))  # keeps every step as long as the chat decode allows
    while sim.reqs["chat"].seqs[0].num_output_tokens < 20:
        sim.step()
    steps = len(sim.step_times)
    assert max(sim.step_times[2:]) < tpot * 0.9  # held under the margin
    sim.add(_req("urgent", 250, 4, arrival=sim.now, slo=SLOTarget(ttft_s=0.5)))
    out = sim.step()
    assert [s.num_new_tokens for s in out.scheduled if s.seq.request.request_id == "urgent"] == [250]
    assert sim.step_times[steps] > tpot  # longer than the target itself
    while "chat" not in sim.done:
        sim.step()
    assert sim.tpot("chat") <= tpot * TPOT_HARD


def test_only_the_most_urgent_prompt_gets_the_progress_floor():
    """With no time left in a step, the most urgent prompt with targets still gets a block; the
    ones behind it wait instead of taking a block each (which would delay it for all of them)."""
    sim = Sim("slo")
    for i in range(30):  # their decodes fill every step's time
        sim.add(_req(f"chat{i}", 8, 40, arrival=0.0, slo=SLOTarget(tpot_s=COEF[0] * 1.2)))
    sim.step()
    sim.add(_req("first", 200, 4, arrival=sim.now, slo=SLOTarget(ttft_s=10.0)))
    sim.add(_req("second", 200, 4, arrival=sim.now, slo=SLOTarget(ttft_s=20.0)))
    out = sim.step()
    got = {s.seq.request.request_id: s.num_new_tokens for s in out.scheduled}
    assert got.get("first") == BLOCK and "second" not in got, got


def test_time_lent_to_an_urgent_prompt_that_cannot_run_is_not_spent_by_best_effort():
    """The urgent prompt cannot be admitted (no sequence slot, and the best effort that holds it
    sorts ahead); the longer step lent for it must not go to best effort instead (review)."""
    def step_len(with_urgent: bool) -> float:
        sim = Sim("slo", max_num_seqs=2)
        sim.add(_req("chat", 16, 200, arrival=0.0, slo=SLOTarget(tpot_s=0.03)))
        sim.add(_req("batch", 8000, 4, arrival=0.0, priority=-1))
        for _ in range(12):
            sim.step()
        if with_urgent:
            sim.add(_req("urgent", 3000, 4, arrival=sim.now, slo=SLOTarget(ttft_s=5.0)))
        out = sim.step()
        assert all(s.seq.request.request_id != "urgent" for s in out.scheduled)
        return sim.step_times[-1]

    assert step_len(True) == pytest.approx(step_len(False), rel=0.05)


def test_room_is_made_only_for_the_prompt_a_capped_step_admits():
    """Under a step time cap only the most urgent prompt with targets is sure to be admitted;
    best effort is not preempted for the ones behind it (review)."""
    sim = Sim("slo", max_num_seqs=4)
    sim.add(_req("chat", 8, 100, arrival=0.0, slo=SLOTarget(tpot_s=COEF[0] * 1.3)))
    for i in range(3):
        sim.add(_req(f"b{i}", 32, 100, arrival=0.0))
    for _ in range(6):
        sim.step()
    assert len(sim.sched.running) == 4
    sim.add(_req("first", 200, 4, arrival=sim.now, slo=SLOTarget(ttft_s=10.0)))
    sim.add(_req("second", 200, 4, arrival=sim.now, slo=SLOTarget(ttft_s=20.0)))
    out = sim.step()
    assert len(out.preempted) == 1, [s.request.request_id for s in out.preempted]


def test_step_features_and_row_costs_are_row_features_per_chunk():
    """The engine's per-step features (one numpy pass over the step) equal row_features of each
    chunk, and row_costs equals row_cost row by row: decodes, prompt chunks, completing chunks."""
    import numpy as np

    from tokenmill.engine.scheduler import ScheduledSeq
    from tokenmill.engine.slo import row_features, step_features

    rng = random.Random(5)
    m = StepTimeModel(COEF)
    chunks = []
    for i in range(40):
        req = _req(f"r{i}", rng.randint(1, 300), 8, 0.0)
        seq = req.seqs[0]
        start = rng.randint(0, seq.num_tokens - 1)
        chunks.append(ScheduledSeq(seq, rng.randint(1, seq.num_tokens - start), start))
    feats = step_features(chunks)
    want = np.array([row_features(s.num_new_tokens, s.start, s.completes) for s in chunks])
    assert feats.shape == (40, 3) and {s.completes for s in chunks} == {True, False}
    np.testing.assert_allclose(feats, want, rtol=1e-15)
    np.testing.assert_allclose(m.row_costs(feats), [m.row_cost(*r) for r in want], rtol=1e-12)
    assert step_features([]).shape == (0, 3)


def test_step_time_model_solves_every_few_steps_and_at_once_when_surprised():
    """After its warm-up the fit is solved every REFIT_EVERY steps (coefficients a few steps
    behind), at once when a step is off its prediction, and fit()/to_dict() are always exact: the
    same coefficients as a model solving after every step."""
    import numpy as np

    from tokenmill.engine import slo

    def steps(rng):
        for _ in range(400):
            tokens = rng.choice([1, 8, 64, 300])
            rows, attn = min(tokens, 8), tokens * rng.randint(0, 2000) / 1024
            yield tokens, rows, attn, 0.02 + 2e-4 * tokens + 1e-4 * rows + 2e-6 * attn + rng.uniform(0, 1e-4)

    lazy, eager = StepTimeModel(COEF), StepTimeModel(COEF)
    solves = []
    solve = lazy._solve
    lazy._solve = lambda: (solves.append(lazy.num_observed), solve())[1]
    for x in steps(random.Random(3)):
        lazy.observe(*x)
        eager.observe(*x)
        eager._solve()
    assert solves[:slo.REFIT_WARMUP] == list(range(1, slo.REFIT_WARMUP + 1))
    later = solves[slo.REFIT_WARMUP:]
    assert 0 < len(later) <= (400 - slo.REFIT_WARMUP) // slo.REFIT_EVERY + 5, later  # steady: a few surprises
    assert all(b - a <= slo.REFIT_EVERY for a, b in zip(solves, solves[1:]))
    # a step three times as long as predicted is solved in at once
    n = lazy.num_observed
    long = 3 * lazy.predict(8, 8, 1.0)
    lazy.observe(8, 8, 1.0, long)
    assert solves[-1] == n + 1
    eager.observe(8, 8, 1.0, long)
    lazy.observe(8, 8, 1.0, eager.predict(8, 8, 1.0))  # an expected step: left for later
    eager.observe(8, 8, 1.0, eager.predict(8, 8, 1.0))
    eager._solve()
    assert solves[-1] == n + 1 and not np.array_equal(lazy.coef, eager.coef)
    assert lazy.to_dict() == eager.to_dict()
    np.testing.assert_array_equal(lazy.coef, eager.coef)


def test_a_request_admitted_already_is_not_admitted_again(model_dir):
    """A cascade's escalation and test-time compute's later launches are engine requests of a
    request the server admitted already; their TTFT budget counts from the arrival, long spent,
    and admission would refuse them half-way (`slo_admitted` skips it; `uncounted` is metrics')."""
    import time

    from tokenmill import LLM
    from tokenmill.engine.slo import SLOAdmissionError

    eng = LLM(model_dir, scheduling_policy="slo", slo_admission="reject", kv_cache_memory_bytes=4 * 2**20).engine
    params = SamplingParams(max_tokens=2, temperature=0)
    late = time.time() - 10  # arrived 10 s ago, with a 1 s target
    prompt = {"prompt_token_ids": [5] * 8, "slo": {"ttft_ms": 1000}}
    with pytest.raises(SLOAdmissionError, match="predicted time to first token"):
        eng.add_request(prompt, params, request_id="fresh", arrival_time=late)
    eng.add_request({**prompt, "slo_admitted": True}, params, request_id="escalated", arrival_time=late)
    eng.add_request({**prompt, "slo_admitted": True, "uncounted": True}, params, request_id="wave",
                    arrival_time=late)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert sorted(done) == ["escalated", "wave"]
    assert [o.uncounted for o in (done["escalated"], done["wave"])] == [False, True]
    assert not any(o.slo_demoted for o in done.values())


def test_admission_and_laxity_count_a_cached_prefix_as_done():
    """A prompt whose prefix the cache holds is predicted as the rest alone: it was predicted whole,
    and a request that would meet its TTFT target was refused (or demoted)."""
    sim = Sim("slo", mnbt=256)
    prompt = [random.Random(5).randrange(50_000) for _ in range(480)]
    sim.add(Request("warm", None, prompt, SamplingParams(max_tokens=2), 0.0))
    sim.run([])  # its 29 full blocks (464 tokens) stay in the prefix cache

    def check(tokens: list[int], rid: str) -> float:
        return sim.sched.admission_check(Request(rid, None, tokens, SamplingParams(max_tokens=2), 0.0,
                                                 slo=SLOTarget(ttft_s=1.0)).seqs[0])

    hit, cold = check(prompt[:-1] + [7], "hit"), check(list(range(480)), "cold")
    rest = check(prompt[-16:], "rest")  # the 16 tokens the cache lacks, with no context
    assert hit < 0.5 * cold and rest <= hit < 1.5 * rest
    seq = Request("hit2", None, prompt[:-1] + [7], SamplingParams(max_tokens=2), 0.0,
                  slo=SLOTarget(ttft_s=1.0)).seqs[0]
    cold_seq = Request("cold2", None, list(range(480)), SamplingParams(max_tokens=2), 0.0,
                       slo=SLOTarget(ttft_s=1.0)).seqs[0]
    assert sim.sched.order(seq)[2] > sim.sched.order(cold_seq)[2]  # more laxity: less to prefill
