"""The scheduler on a simulated clock: `tokenmill bench slo --simulate`, and the scheduler tests.

The real Scheduler and BlockManager run as plain bookkeeping; each step advances the clock by
what a step-time model (engine/slo.py) predicts for it, and sampled rows get a token. TTFT and
TPOT are then exact functions of the policy's choices and the model: no HTTP, no prediction
error, no noise. With a model calibrated on real hardware it tells what a policy can reach
there at best (what the policy and the hardware's step costs allow), so a benchmark's gap to it
is what serving adds; with other coefficients it answers what-ifs (a faster step, other targets).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request
from tokenmill.engine.slo import SLOTarget, StepTimeModel, step_features
from tokenmill.sampling_params import SamplingParams


class Sim:
    """A scheduler over a block manager, stepped on a simulated clock."""

    def __init__(self, policy: str, coef: tuple[float, float, float, float], num_blocks: int = 4096,
                 max_num_seqs: int = 64, mnbt: int = 512, block_size: int = 16) -> None:
        self.model = StepTimeModel(prior=coef)
        self.bm = BlockManager(num_blocks, block_size)
        self.now = 0.0
        self.sched = Scheduler(self.bm, max_num_seqs, mnbt, policy=policy, step_model=self.model,
                               clock=lambda: self.now)
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.step_times: list[float] = []
        self.reqs: dict[str, Request] = {}

    def add(self, req: Request) -> None:
        self.reqs[req.request_id] = req
        self.sched.add_request(req.seqs)

    def step(self):
        return self.end(*self.begin())

    def begin(self) -> tuple[Any, float]:
        """A step scheduled now: what it holds and how long it takes (end applies it)."""
        out = self.sched.schedule()
        dt = self.model.predict(*step_features(out.scheduled).sum(axis=0).tolist())
        return out, dt if out.scheduled else 0.001

    def end(self, out: Any, dt: float) -> Any:
        """The step begin scheduled, done: the clock past it, its tokens appended."""
        self.now += dt
        if out.scheduled:
            self.step_times.append(dt)
        self.sched.advance(out)
        for s in out.scheduled:
            seq = s.seq
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(1)
                rid = seq.request.request_id
                self.first.setdefault(rid, self.now)
                if seq.request.metrics.first_token_time is None:
                    seq.request.metrics.first_token_time = self.now
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.finish(seq)
                    self.done[rid] = self.now
        return out

    def run(self, arrivals: list[Request], until: float | None = None) -> None:
        """Adds each request when the clock reaches its arrival, steps until all are done (or until)."""
        pending = sorted(arrivals, key=lambda r: r.arrival_time)
        while pending or self.sched.has_unfinished():
            while pending and pending[0].arrival_time <= self.now:
                self.add(pending.pop(0))
            if not self.sched.has_unfinished():
                self.now = pending[0].arrival_time
                continue
            self.step()
            if until is not None and self.now > until:
                break

    def ttft(self, rid: str) -> float:
        return self.first[rid] - self.reqs[rid].arrival_time

    def tpot(self, rid: str) -> float:
        req = self.reqs[rid]
        return (self.done[rid] - self.first[rid]) / max(1, req.params.max_tokens - 1)


def parse_step_model(text: str) -> tuple[float, float, float, float]:
    """`--step-model STEP,TOKEN,ROW,ATTN` (seconds); ValueError naming the flag otherwise."""
    try:
        coef = tuple(float(x) for x in text.split(","))
    except ValueError:
        coef = ()
    if len(coef) != 4 or not all(c >= 0 for c in coef) or not coef[0] + coef[1] > 0:
        raise ValueError(f"--step-model: expected 4 comma-separated numbers >= 0 (STEP or TOKEN > 0), got {text!r}")
    return coef  # type: ignore[return-value]


def make_request(rid: str, prompt: int, out: int, arrival: float, slo: SLOTarget | None = None,
                 priority: int = 0) -> Request:
    rng = random.Random(rid)  # distinct prompts: no prefix-cache hits between requests
    return Request(rid, None, [rng.randrange(50_000) for _ in range(prompt)], SamplingParams(max_tokens=out),
                   arrival, priority, slo=slo)


@dataclass
class Workload:
    """`tokenmill bench slo`'s mix: a share of interactive requests (lengths +-25%) and batch ones."""

    interactive_len: tuple[int, int] = (64, 24)
    batch_len: tuple[int, int] = (384, 96)
    interactive_share: float = 0.3

    def make(self, rng: random.Random, i: int, at: float, slo: SLOTarget | None) -> Request:
        interactive = rng.random() < self.interactive_share
        p, o = self.interactive_len if interactive else self.batch_len
        p = max(1, round(p * rng.uniform(0.75, 1.25)))
        o = max(2, round(o * rng.uniform(0.75, 1.25)))
        return make_request(f"{'i' if interactive else 'b'}{i}", p, o, at, slo if interactive else None)


def simulate(coef: tuple[float, float, float, float], workload: Workload, *, load: float = 2.0,
             target_factor: float = 3.0, duration: float = 90.0, max_num_seqs: int = 16, mnbt: int = 512,
             capacity_requests: int = 48, policies: tuple[str, ...] = ("fcfs", "slo"), seed: int = 0) -> dict[str, Any]:
    """`bench slo`'s three phases on the simulated clock: the unloaded baseline, the capacity burst,
    then the same Poisson overload per policy. Figures as bench slo reports them."""
    if capacity_requests < 1 or not duration > 0 or not load > 0:
        raise ValueError(f"capacity_requests must be >= 1 and duration and load > 0, got {capacity_requests}, "
                         f"{duration:g} and {load:g}")
    rng = random.Random(seed)
    kw = {"max_num_seqs": max_num_seqs, "mnbt": mnbt}
    # Baseline: one interactive request alone, at the nominal lengths.
    p, o = workload.interactive_len
    base = Sim("fcfs", coef, **kw)
    base.run([make_request("x", p, o, 0.0)])
    ttft, tpot = base.ttft("x"), base.tpot("x")
    slo = SLOTarget(target_factor * ttft, target_factor * tpot)
    # Capacity: a burst of the mix, all at once.
    cap = Sim("fcfs", coef, **kw)
    cap.run([workload.make(rng, i, 0.0, None) for i in range(capacity_requests)])
    capacity = capacity_requests / cap.now
    rate = load * capacity
    t, arrivals = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        arrivals.append((len(arrivals), t))
    out: dict[str, Any] = {"step_model": list(coef), "baseline": {"ttft_ms": ttft * 1000, "tpot_ms": tpot * 1000},
                           "capacity": {"requests_per_s": capacity}, "offered_requests_per_s": rate,
                           "targets": slo.to_dict(), "requests": len(arrivals)}
    for policy in policies:
        wrng = random.Random(seed + 1)  # the same requests for every policy
        reqs = [workload.make(wrng, i, at, slo) for i, at in arrivals]
        sim = Sim(policy, coef, **kw)
        sim.run(reqs, until=duration)
        inter = [r.request_id for r in reqs if r.slo is not None and r.arrival_time < 0.9 * duration]
        met = [rid for rid in inter if rid in sim.done and sim.ttft(rid) <= slo.ttft_s and sim.tpot(rid) <= slo.tpot_s]
        batch = sum(r.seqs[0].num_output_tokens for r in reqs if r.slo is None)
        out[policy] = {"interactive_requests": len(inter), "interactive_met": len(met),
                       "interactive_attainment": len(met) / len(inter) if inter else None,
                       "batch_output_tokens_per_s": batch / duration, "steps": len(sim.step_times),
                       "mean_step_ms": 1000 * sum(sim.step_times) / max(1, len(sim.step_times))}
    if "fcfs" in out and "slo" in out:
        out["batch_throughput_loss"] = 1 - out["slo"]["batch_output_tokens_per_s"] / max(
            out["fcfs"]["batch_output_tokens_per_s"], 1e-9)
    return out


def format_simulation(out: dict[str, Any]) -> str:
    c = out["step_model"]
    pols = [p for p in ("fcfs", "priority", "slo") if p in out]
    lines = [f"simulated (step-time model: {1000 * c[0]:.1f} ms a step, {1000 * c[1]:.3f} ms a token, "
             f"{1000 * c[2]:.3f} ms a sampled row, {1000 * c[3]:.4f} ms per 1k attention pairs)",
             f"unloaded interactive: TTFT {out['baseline']['ttft_ms']:.0f} ms, "
             f"TPOT {out['baseline']['tpot_ms']:.1f} ms; "
             f"targets TTFT {out['targets']['ttft_ms']:.0f} ms, TPOT {out['targets']['tpot_ms']:.1f} ms",
             f"capacity {out['capacity']['requests_per_s']:.2f} requests/s, offered "
             f"{out['offered_requests_per_s']:.2f} requests/s ({out['requests']} requests)",
             f"  {'':<28}" + "".join(f"{p:>12}" for p in pols)]
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    for label, fn in (("interactive attainment", lambda s: pct(s["interactive_attainment"])),
                      ("batch output tokens/s", lambda s: f"{s['batch_output_tokens_per_s']:.1f}"),
                      ("steps (mean ms)", lambda s: f"{s['steps']} ({s['mean_step_ms']:.0f})")):
        lines.append(f"  {label:<28}" + "".join(f"{fn(out[p]):>12}" for p in pols))
    if "batch_throughput_loss" in out:
        lines.append(f"  batch throughput loss with slo: {out['batch_throughput_loss']:.1%}")
    return "\n".join(lines)
