"""A fleet on a simulated clock: what goodput a layout of prefill and decode workers gives.

`simulate_fleet` runs a workload (Poisson arrivals, prompt and output lengths) through a layout:
N colocated replicas, or P prefill workers and D decode workers. Each worker is the real Scheduler
and BlockManager (bench/slo_sim.Sim) whose steps take what a step-time model measured on the
hardware predicts (engine/slo.py: a step's fixed cost, per token, per sampled row, per attention
pair). Routing is the router's: the decode worker with the least prefill work before the first
token (policy.kv_aware_cost), and for a layout with prefill workers the router's own decision
(router/disagg.decide) between a remote and a local prefill. A remote prefill is a one-token
request on a prefill worker; when its step ends, its KV takes the transfer model's time (a fixed
cost and bytes over a bandwidth, both measured) and enters the decode worker's prefix cache the
way the real import does (BlockManager.take_imports), so the decode worker computes only the last
block; writing those blocks holds the decode worker's engine thread between two steps (the
end of the measured transfer time: TransferModel.stall). TTFT is the decode worker's first
token, TPOT its later ones.

Goodput (DistServe's measure) is the rate of requests that meet both latency targets: what a
layout is worth under those targets, where throughput alone would count requests served too late.
The simulator leaves out the HTTP and tokenization around each request and the noise of a shared
machine: `tokenmill bench disagg` measures the same workload on real servers beside its prediction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tokenmill.bench.slo_sim import Sim, make_request
from tokenmill.engine.block_manager import block_hashes
from tokenmill.engine.sequence import Request, Sequence
from tokenmill.engine.slo import SLOTarget
from tokenmill.router.disagg import DisaggConfig, decide, left_to_compute
from tokenmill.router.policy import Candidate, KVAwareWeights, kv_aware_cost
from tokenmill.sampling_params import SamplingParams
from tokenmill.stats import percentile_summary


@dataclass(frozen=True)
class Layout:
    """prefill == 0: `decode` colocated replicas; else prefill workers and decode workers."""

    decode: int
    prefill: int = 0
    policy: str = "auto"  # the router's --disagg-policy (with prefill workers)

    @property
    def name(self) -> str:
        if not self.prefill:
            return f"{self.decode} colocated"
        return f"{self.prefill}P+{self.decode}D ({self.policy})"

    @classmethod
    def parse(cls, text: str) -> Layout:
        """"2" (colocated), "1p1d", "1p1d:always"."""
        spec, _, policy = text.strip().lower().partition(":")
        try:
            if "p" in spec:
                p, d = spec.split("p")
                return cls(int(d.rstrip("d")), int(p), policy or "auto")
            if policy:
                raise ValueError
            return cls(int(spec))
        except ValueError:
            raise ValueError(f"layout {text!r}: N (colocated replicas) or PpDd[:auto|always] (1p1d:always)") from None


@dataclass(frozen=True)
class TransferModel:
    latency_s: float  # a transfer's fixed cost (the router's prefill call, export and import exchanges)
    bytes_per_s: float
    kv_bytes_per_token: int
    # The import's own work on the decode worker's engine thread (writing the blocks into its cache),
    # between two of its steps: every sequence running there waits for it.
    import_bytes_per_s: float = float("inf")

    def seconds(self, tokens: int) -> float:
        return self.latency_s + tokens * self.kv_bytes_per_token / self.bytes_per_s

    def stall(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.import_bytes_per_s


@dataclass
class SimWorkload:
    prompt_len: int
    output_len: int
    rate: float  # requests per second (Poisson)
    duration: float
    jitter: float = 0.25  # lengths uniform in +-25%
    seed: int = 0

    def requests(self) -> list[tuple[str, int, int, float]]:
        """(id, prompt tokens, output tokens, arrival) of every request: the same list for the
        simulator and the measured run."""
        rng = random.Random(self.seed)
        out, t = [], 0.0
        while True:
            t += rng.expovariate(self.rate)
            if t >= self.duration:
                return out
            j = self.jitter
            out.append((f"r{len(out)}", max(2, round(self.prompt_len * rng.uniform(1 - j, 1 + j))),
                        max(2, round(self.output_len * rng.uniform(1 - j, 1 + j))), t))


@dataclass
class _Worker:
    sim: Sim
    role: str  # "decode" or "prefill"
    # The router's ledger of it (router._Ticket): request -> uncached prompt tokens, from the routing
    # decision until the request's first token (a prefill worker's: until its prefill answers); then
    # the requests decoding, until they end.
    prefilling: dict[str, int] = field(default_factory=dict)
    decoding: set[str] = field(default_factory=set)
    step: tuple[float, Any, float] | None = None  # the step in flight: (its end, what it holds, its length)
    blocked_until: float = 0.0  # an import holds its engine thread until then (between two steps)
    stall_after_step: float = 0.0  # an import waiting for the step in flight (its length)
    ready_after_step: float = 0.0  # (and when its transfer ends at the earliest)

    def busy(self) -> bool:
        return self.step is not None or self.sim.sched.has_unfinished()

    def next_event(self) -> float:
        return self.step[0] if self.step is not None else max(self.sim.now, self.blocked_until)

    def begin(self) -> None:
        self.sim.now = max(self.sim.now, self.blocked_until)
        out, dt = self.sim.begin()
        self.step = (self.sim.now + dt, out, dt)

    def end(self) -> Any:
        assert self.step is not None
        t, out, dt = self.step
        self.step = None
        self.sim.end(out, dt)
        if self.stall_after_step:
            self.blocked_until = max(self.blocked_until, t + self.stall_after_step, self.ready_after_step)
            self.stall_after_step = self.ready_after_step = 0.0
        return out

    def candidate(self, name: str, token_ids: list[int]) -> Candidate:
        s = self.sim.sched
        bm = self.sim.bm
        cached = len(bm.cached_prefix(block_hashes(token_ids, bm.block_size))) * bm.block_size
        return Candidate(name, inflight=len(self.prefilling) + len(self.decoding),
                         queued_prefill=sum(self.prefilling.values()),
                         running=max(len(s.running), len(self.decoding)), waiting=len(s.waiting),
                         kv_usage=bm.usage, cached_tokens=cached)


def simulate_fleet(coef: tuple[float, float, float, float], layout: Layout, workload: SimWorkload, slo: SLOTarget,
                   transfer: TransferModel, *, max_num_seqs: int = 64, mnbt: int = 512, num_blocks: int = 4096,
                   block_size: int = 16, disagg: DisaggConfig | None = None,
                   requests: list[tuple[str, int, int, float]] | None = None,
                   coefs: list[tuple[float, float, float, float]] | None = None) -> dict[str, Any]:
    """The layout's latencies, SLO attainment and goodput on the workload (module docstring); requests
    (id, prompt, output, arrival) in place of the workload's own; coefs: each worker's own step-time
    model (decode workers first, then prefill workers) in place of coef for all. Events are taken
    in time order; a step is scheduled at its start and takes effect at its end (what routing sees
    meanwhile is what the router sees: the requests it sent, their prompts not yet done)."""
    cfg = disagg or DisaggConfig(policy=layout.policy)
    if layout.prefill and cfg.policy != layout.policy:
        cfg = DisaggConfig(layout.policy, cfg.min_tokens, cfg.max_queue_tokens, cfg.timeout_s)
    kw = {"max_num_seqs": max_num_seqs, "mnbt": mnbt, "num_blocks": num_blocks, "block_size": block_size}
    coefs = coefs or [coef] * (layout.decode + layout.prefill)
    if len(coefs) != layout.decode + layout.prefill:
        raise ValueError(f"coefs: one per worker ({layout.decode + layout.prefill}), got {len(coefs)}")
    decoders = [_Worker(Sim("fcfs", coefs[i], **kw), "decode") for i in range(layout.decode)]
    prefillers = [_Worker(Sim("fcfs", coefs[layout.decode + i], **kw), "prefill") for i in range(layout.prefill)]
    workers = decoders + prefillers
    weights = KVAwareWeights()
    reqs = workload.requests() if requests is None else sorted(requests, key=lambda r: r[3])
    arrival = {rid: at for rid, _, _, at in reqs}
    lengths = {rid: (p, o) for rid, p, o, _ in reqs}
    pending = list(reversed(reqs))  # popped from the end, in arrival order
    # Transfers: (when the import may start: its end less the engine's own part, its end, decode worker, request)
    transit: list[tuple[float, float, int, Request]] = []
    owner: dict[str, int] = {}  # request -> its decode worker
    holds: dict[str, tuple[_Worker, Sequence]] = {}  # imported prompts held for their requests
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    remote = 0

    def reclaimable(w: _Worker):  # (LLMEngine's: the worker's holds may give way, oldest first)
        return lambda: [(rid, h.block_table) for rid, (hw, h) in holds.items() if hw is w]

    def reclaim(rid: str) -> None:
        hw, holder = holds.pop(rid)
        hw.sim.bm.free(holder)

    for w in decoders:
        w.sim.bm.reclaimable, w.sim.bm.reclaim = reclaimable(w), reclaim

    def admit(w: _Worker, req: Request, at: float) -> None:
        if not w.busy():
            w.sim.now = max(w.sim.now, at)
        w.sim.add(req)

    while pending or transit or any(w.busy() for w in workers):
        t_arr = pending[-1][3] if pending else float("inf")
        t_tr = min((x[0] for x in transit), default=float("inf"))
        busy = [w for w in workers if w.busy()]
        t_w = min((w.next_event() for w in busy), default=float("inf"))
        if t_arr <= t_tr and t_arr <= t_w:
            rid, p, o, at = pending.pop()
            req = make_request(rid, p, o, at)
            ids = req.prompt_token_ids
            cands = [w.candidate(str(i), ids) for i, w in enumerate(decoders)]
            d = min(range(len(decoders)), key=lambda i: (kv_aware_cost(cands[i], p, weights), cands[i].inflight, i))
            owner[rid] = d
            decoders[d].prefilling[rid] = max(0, p - cands[d].cached_tokens)
            if prefillers:
                pc = [w.candidate(str(i), ids) for i, w in enumerate(prefillers)]
                i, _why = decide(cfg, p, cands[d], pc)
                if i is not None:
                    remote += 1
                    # (on the router's ledger: the decode worker's part is the last block)
                    decoders[d].prefilling[rid] = min(decoders[d].prefilling[rid],
                                                      left_to_compute(p, decoders[d].sim.bm.block_size))
                    prefillers[i].prefilling[rid] = max(0, p - pc[i].cached_tokens)
                    admit(prefillers[i], Request(rid, None, list(ids), SamplingParams(max_tokens=1), at), at)
                    continue
            admit(decoders[d], req, at)
        elif t_tr <= t_w:
            transit.sort(key=lambda x: x[0])
            start, ready, d, req = transit.pop(0)
            w = decoders[d]
            bm = w.sim.bm
            keys = block_hashes(req.prompt_token_ids, bm.block_size)
            taken, held = bm.take_imports(keys)
            bm.release_imports(keys, taken, held, True)
            if w.step is not None:  # (the import waits for the step in flight, then holds the thread)
                w.stall_after_step += transfer.stall(len(taken) * bm.block_size)
                w.ready_after_step = max(w.ready_after_step, ready)
            else:
                w.blocked_until = max(w.blocked_until, ready)
            holder = Sequence(req, 0, [], 0)  # (held until the request ends, as LLMEngine.import_kv holds)
            holder.block_table = bm.cached_prefix(keys)
            if len(holder.block_table) <= bm.num_blocks // 2:
                for block in holder.block_table:
                    bm._ref(block)
                holds[req.request_id] = (w, holder)
                # (at most half the cache held, the oldest let go first: LLMEngine._add_hold's rule for
                # holds that share no blocks, as the simulated workloads' distinct prompts do)
                mine = [r for r, (hw, _) in holds.items() if hw is w]
                while sum(len(holds[r][1].block_table) for r in mine) > bm.num_blocks // 2 and len(mine) > 1:
                    bm.free(holds.pop(mine.pop(0))[1])
            rid = req.request_id
            w.prefilling[rid] = left_to_compute(len(req.prompt_token_ids), bm.block_size, len(holder.block_table))
            admit(w, req, start)
        else:
            w = min(busy, key=lambda x: x.next_event())
            if w.step is None:
                w.begin()
                continue
            out = w.end()
            for s in out.scheduled:
                rid = s.seq.request.request_id
                if w.role == "prefill":
                    if rid in w.sim.done:
                        w.sim.done.pop(rid)  # (the prefill's own end is not the request's)
                        w.prefilling.pop(rid, None)
                        p, o = lengths[rid]
                        ready = w.sim.now + transfer.seconds(p)
                        full = p // w.sim.bm.block_size * w.sim.bm.block_size
                        transit.append((ready - min(transfer.seconds(p), transfer.stall(full)), ready, owner[rid],
                                        make_request(rid, p, o, arrival[rid])))
                    continue
                if rid in w.sim.first and rid not in first:
                    first[rid] = w.sim.first[rid]
                    w.prefilling.pop(rid, None)
                    w.decoding.add(rid)
                if rid in w.sim.done and rid not in done:
                    done[rid] = w.sim.done[rid]
                    w.decoding.discard(rid)
                    if rid in holds:
                        hw, holder = holds.pop(rid)
                        hw.sim.bm.free(holder)
    return _summary(layout, reqs, first, done, slo, workload, remote)


def _summary(layout: Layout, reqs: list[tuple[str, int, int, float]], first: dict[str, float],
             done: dict[str, float], slo: SLOTarget, wl: SimWorkload, remote: int) -> dict[str, Any]:
    ttft = {rid: first[rid] - at for rid, _, _, at in reqs if rid in first}
    tpot = {rid: (done[rid] - first[rid]) / max(1, o - 1) for rid, _, o, _ in reqs if rid in done}
    return summarize(layout.name, reqs, ttft, tpot, slo, wl.duration, remote)


def summarize(name: str, reqs: list[tuple[str, int, int, float]], ttft: dict[str, float], tpot: dict[str, float],
              slo: SLOTarget, duration: float, remote: int | None = None) -> dict[str, Any]:
    """A layout's figures, simulated or measured: latency percentiles in ms, SLO attainment and
    goodput (requests/s meeting both targets). A request that never finished meets none."""
    met = [rid for rid, _, _, _ in reqs
           if rid in ttft and rid in tpot and (slo.ttft_s is None or ttft[rid] <= slo.ttft_s)
           and (slo.tpot_s is None or tpot[rid] <= slo.tpot_s)]
    n = len(reqs)
    return {"layout": name, "requests": n, "finished": len(tpot), "met": len(met),
            "attainment": len(met) / n if n else None, "goodput_rps": len(met) / duration,
            "ttft_ms": percentile_summary(list(ttft.values()), 1000),
            "tpot_ms": percentile_summary(list(tpot.values()), 1000), "remote_prefills": remote}
