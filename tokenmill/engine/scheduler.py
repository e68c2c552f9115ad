"""Continuous batching with one token budget per step.

There is no prefill phase and no decode phase: every sequence has tokens and a count of
tokens whose KV is already cached, and each step hands out up to
`max_num_batched_tokens` new tokens. Running sequences go first (a decode costs one
token, an unfinished prompt takes a chunk of whatever budget is left), then waiting
sequences are admitted in priority order. When the cache runs out of blocks, the
lowest-priority running sequence is preempted by recompute: its blocks are freed and it
returns to the waiting queue with 0 computed tokens, keeping its generated tokens.

Prefix caching happens at admission: a waiting sequence first takes the cached blocks that
hold the longest prefix of its tokens and starts computing after them. Its own full blocks
are offered to the cache as soon as a step has computed them (`advance`).

Policies (`scheduling_policy`) decide the order: `fcfs` by arrival, `priority` by the
request's priority then arrival (vLLM's), `slo` by latency targets (engine/slo.py). Under `slo`,
requests with targets form a class that is served before best-effort work in every step: their
decodes, then their prefill chunks, then their admissions, each ordered by laxity (the TTFT
deadline minus the predicted prefill time); best-effort work gets what is left. While a decode
with a TPOT target runs, the step is sized to keep it: the step-time model predicts each chunk's
cost and prefill chunks (and best-effort decodes) take only the time the tightest target leaves.
A request with targets that finds no room (max_num_seqs, or KV blocks) preempts best-effort
sequences. `admission_check` predicts a new request's TTFT from the work queued ahead of it, so
the engine can refuse or demote one that cannot make its target.

Samples of one request (n > 1) share their prompt: only sample 0 is queued; the others wait
(FORK_WAITING) until the step that completes sample 0's prompt. That step samples a first
token for each of them from the same logits row, and `advance` forks them onto sample 0's
blocks, so the prompt is prefilled once. Samples that would push the batch past
max_num_seqs are queued as ordinary sequences instead (they then reuse the prompt's full
blocks through the prefix cache).
"""

from __future__ import annotations

import bisect
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import SeqStatus, Sequence
from tokenmill.engine.slo import StepTimeModel, row_features

POLICIES = ("fcfs", "priority", "slo")
# A step runs at most this share of the tightest TPOT target: the rest is the engine's own work
# between steps (sampling output, detokenizing, streaming) and the model's error.
# A decode with a TPOT target must have its next token by first_token_time + tokens so far x target x
# TPOT_MARGIN (the mean over its tokens is what the target bounds, so time banked by fast steps may pay
# for a long one, up to TPOT_BANK targets' worth at once); the rest of the margin is the engine's own
# work between steps and the model's error.
TPOT_MARGIN = 0.85
TPOT_BANK = 6.0
# How far a prompt with a TTFT target may stretch a step into the decodes' margin (see _step_time_cap).
TPOT_HARD = 0.95
# While requests with TTFT targets keep arriving, a step may take this share of the least slack among
# them (their target less their own prefill), for SLACK_WINDOW_S after the last one.
TTFT_SHARE = 0.6
SLACK_WINDOW_S = 10.0


def _key(seq: Sequence) -> tuple:
    return seq.sched_key


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # num_computed_tokens when scheduled: the chunk covers [start, start + num_new_tokens)
    # Samples of the same request that fork off this chunk's logits row (it completes the prompt).
    forks: list[Sequence] = field(default_factory=list)
    num_spec: int = 0  # draft tokens after the last token (seq.spec_token_ids[:num_spec]), in num_new_tokens
    # True when this chunk reaches the end of the sequence, so a token is sampled. Fixed when it is
    # scheduled (drafts added later do not change it): with async scheduling the sequence grows a
    # pending token before the step's energy and features are accounted.
    completes: bool = field(init=False)

    def __post_init__(self) -> None:
        self.completes = self.start + self.num_new_tokens - self.num_spec == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the step runs
    # Sequences whose blocks were freed since the last step (finished, aborted, preempted): the
    # runner drops them from its persistent batch before this step's sequences take rows.
    freed_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 propose: Callable[[Sequence, int], int] | None = None, policy: str = "priority",
                 step_model: StepTimeModel | None = None, clock: Callable[[], float] = time.time) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling_policy: must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.clock = clock  # the time requests' metrics use (time.time in the engine; a test's own clock)
        self.step_model = step_model if step_model is not None else StepTimeModel()
        self.block_manager = block_manager
        # Speculative decoding: propose(seq, at_most) readies up to at_most drafts for a decode and
        # says how many (they go in seq.spec_token_ids, or the runner fills them in).
        self.propose = propose
        # With a draft model, a block goes to the prefix cache only once the draft's KV covers it too.
        self.draft_kv = False
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len: int | None = None  # (set by the engine: a sequence ends there)
        self.waiting: list[Sequence] = []  # sorted by sched_key
        self.running: list[Sequence] = []  # sorted by sched_key
        self.fork_waiting: dict[int, list[Sequence]] = {}  # sample 0's seq_id -> samples waiting for it
        self.num_preemptions = 0
        self._recent_slack: collections.deque[tuple[float, float]] = collections.deque()  # (when, seconds)
        self._head_extra: tuple[int, float] | None = None  # (seq_id, seconds) lent to the urgent prompt this step
        self.num_prompt_tokens_computed = 0  # prompt positions run through the model (cache hits and forks excluded)

    # -- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        seq.sched_key = self.order(seq)
        bisect.insort(self.waiting, seq, key=_key)
        slo = seq.request.slo
        if self.policy == "slo" and slo is not None and slo.ttft_s is not None and not seq.num_preemptions:
            # What is left of its TTFT target once its own prefill is paid: a step already running when
            # the next such request arrives must fit in it (_step_time_cap).
            self._recent_slack.append((self.clock(), slo.ttft_s - self.prefill_seconds(seq.num_tokens)))

    def order(self, seq: Sequence) -> tuple:
        """The policy's sort key (lower runs first), fixed when the sequence is queued."""
        if self.policy == "fcfs":
            return (0, 0, 0.0, seq.arrival_time, seq.seq_id)
        if self.policy == "priority":
            return (seq.priority, 0, 0.0, seq.arrival_time, seq.seq_id)
        slo = seq.request.slo
        if slo is None:
            return (seq.priority, 1, 0.0, seq.arrival_time, seq.seq_id)
        # Least laxity first: the latest time its prefill can start and still make the TTFT target.
        ttft = slo.ttft_s if slo.ttft_s is not None else 60.0
        left, done = self._prefill_left(seq)
        laxity = seq.arrival_time + ttft - self.prefill_seconds(left, done)
        return (seq.priority, 0, laxity, seq.arrival_time, seq.seq_id)

    def _prefill_left(self, seq: Sequence, now: bool = True) -> tuple[int, int]:
        """(tokens left to compute, tokens before them) of a sequence; for one not yet admitted, its
        prefix the cache holds counts as done (it may be evicted before: a slight optimism): looked
        up now, or (now False) as it was when the sequence was queued, which costs nothing (an
        arrival's admission check reads every queued prompt ahead of it)."""
        done = seq.num_computed_tokens
        if not seq.block_table:
            if now:
                seq.queued_cached = len(self.block_manager.match_prefix(seq)) * self.block_manager.block_size
            done = max(done, seq.queued_cached)
        return seq.num_tokens - done, done

    def prefill_seconds(self, tokens: int, context: int = 0) -> float:
        """Predicted time to prefill `tokens` alone, in steps of max_num_batched_tokens."""
        m = self.step_model
        steps = max(1, math.ceil(tokens / self.max_num_batched_tokens))
        return steps * (m.coef[0] + m.overhead_s) + m.row_cost(*row_features(tokens, context, False)) + m.coef[2]

    @staticmethod
    def has_targets(seq: Sequence) -> bool:
        return seq.request.slo is not None

    def add_request(self, seqs: list[Sequence]) -> None:
        """Queues a request's samples: the first prefills the prompt, the others wait to fork."""
        self.add(seqs[0])
        if len(seqs) > 1:
            for seq in seqs[1:]:
                seq.status = SeqStatus.FORK_WAITING
            self.fork_waiting[seqs[0].seq_id] = list(seqs[1:])

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence (finished or aborted) from the queues and frees its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.FORK_WAITING:  # it waits for its request's sample 0
            leader = seq.request.seqs[0].seq_id
            sibs = self.fork_waiting.get(leader)
            if sibs is not None and seq in sibs:  # (else a scheduled chunk took it along: advance skips it)
                sibs.remove(seq)
                if not sibs:
                    del self.fork_waiting[leader]
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.num_pending = 0  # (async scheduling: what steps in flight sample for it is dropped)
        # Samples still waiting for a leader that is gone run on their own.
        orphans = self.fork_waiting.pop(seq.seq_id, None)
        for sib in orphans or ():
            self.add(sib)

    @property
    def num_fork_waiting(self) -> int:
        return sum(len(v) for v in self.fork_waiting.values())

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + self.num_fork_waiting

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.fork_waiting)

    # -- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.block_manager.take_copies()  # copies left by a schedule() that raised never ran; their blocks are gone
        self._budget = self.max_num_batched_tokens
        self._time_left: float | None = None
        self._target_prefills = 0  # prompt chunks with targets scheduled so far in this step
        self._scheduled: set[int] = set()
        self._thrashing = False  # a running sequence was preempted for blocks: admit nothing this step
        if self.policy == "slo":
            self._head_extra = None
            self._time_left = self._step_time_cap(extend=True)
            self._make_room(out)
            for slo_class in (True, False):  # requests with targets first, then best effort
                self._schedule_running(out, slo_class)
                self._admit(out, slo_class)
                extra = self._head_extra
                if slo_class and extra is not None and extra[0] not in self._scheduled:
                    # The time lent for the urgent prompt is not best effort's to spend.
                    self._time_left = max(0.0, self._time_left - extra[1])  # type: ignore[operator]
        else:
            self._schedule_running(out, None)
            self._admit(out, None)
        if not out.scheduled and not out.preempted and self.waiting:
            # Only waiting beams whose request's other beams hold the blocks they need: free the
            # lowest-priority waiting beam so the next step can admit (no step may stall for good).
            parked = [s for s in self.running if s.beam_candidates is not None]
            if parked:
                self._preempt(parked[-1])
                out.preempted.append(parked[-1])
        if self.propose is not None and not out.preempted:
            self._add_drafts(out, self._budget)
        self._attach_forks(out)
        out.block_copies = self.block_manager.take_copies()
        out.freed_seq_ids = self.block_manager.take_freed()
        return out

    def _in_class(self, seq: Sequence, slo_class: bool | None) -> bool:
        return slo_class is None or self.has_targets(seq) == slo_class

    def _chunk(self, seq: Sequence, slo_class: bool | None) -> int:
        """How many of the sequence's uncomputed tokens fit this step (0: none)."""
        remaining = seq.num_tokens - seq.num_computed_tokens
        n = min(remaining, self._budget)
        if self._time_left is None or n <= 0:
            return n
        m = self.step_model
        if remaining == 1:  # a decode: the class with targets always decodes, best effort if time is left
            cost = m.row_cost(*row_features(1, seq.num_computed_tokens, True))
            return 1 if slo_class or cost <= self._time_left else 0
        fits = self._fit_tokens(seq.num_computed_tokens, max(0.0, self._time_left))
        if fits >= remaining and m.row_cost(*row_features(remaining, seq.num_computed_tokens, True)) > self._time_left:
            fits = remaining - 1  # completing the prompt adds its sampled row
        if slo_class and not self._target_prefills:
            # The most urgent prompt with targets always makes progress, a block at a time at
            # least; the next ones only in the time left (a block each would delay it for them).
            fits = max(fits, self.block_manager.block_size)
        return min(n, fits)

    def _fit_tokens(self, context: int, seconds: float) -> int:
        """The most prompt tokens after `context` whose cost (row_features, unsampled) fits."""
        c = self.step_model.coef
        a = c[3] / 2048.0  # attention grows with the chunk's own length too: solve the quadratic
        b = c[1] + c[3] * (context + 0.5) / 1024.0
        if a <= 0:
            return int(seconds / b) if b > 0 else self.max_num_batched_tokens
        return int((-b + math.sqrt(b * b + 4 * a * seconds)) / (2 * a))

    def _charge(self, seq: Sequence, start: int, num_new: int) -> None:
        self._budget -= num_new
        if num_new > 1 or start + num_new < seq.num_tokens:
            self._target_prefills += self.has_targets(seq)
        if self._time_left is not None:
            completes = start + num_new == seq.num_tokens
            self._time_left -= self.step_model.row_cost(*row_features(num_new, start, completes))

    def _schedule_running(self, out: SchedulerOutput, slo_class: bool | None) -> None:
        bm = self.block_manager
        if slo_class is None:
            seqs = [s for s in self.running if s.beam_candidates is None]
        else:
            seqs = [s for s in self.running if self._in_class(s, slo_class) and s.beam_candidates is None]
        timed = self._time_left is not None
        if timed:  # decodes before prefill chunks: they hold the TPOT targets
            seqs.sort(key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        running = SeqStatus.RUNNING
        for seq in seqs:
            if self._budget <= 0:
                break
            if seq.status is not running:  # preempted earlier in this loop
                continue
            if seq.num_pending and self._ends(seq):
                continue  # its pending token reaches max_tokens or the context: a row for it would be wasted
            if timed:
                num_new = self._chunk(seq, slo_class)
            else:  # (_chunk without a time budget; inline: this runs for every decode of every step)
                num_new = min(len(seq.token_ids) + seq.num_pending - seq.num_computed_tokens, self._budget)
            if num_new <= 0:
                continue
            while not bm.allocate(seq, num_new):  # (all or nothing)
                # The lowest-priority running sequence not scheduled yet (it may be seq itself).
                victim = next(v for v in reversed(self.running) if v.seq_id not in self._scheduled)
                self._preempt(victim)
                out.preempted.append(victim)
                self._thrashing = True
                if victim is seq:
                    break
            else:
                start = seq.num_computed_tokens
                out.scheduled.append(ScheduledSeq(seq, num_new, start))
                self._scheduled.add(seq.seq_id)
                self._charge(seq, start, num_new)

    def _ends(self, seq: Sequence) -> bool:
        """Whether the sequence is over once its pending tokens are appended, whatever they are."""
        limit = seq.length_limit
        if limit is None:  # (once per sequence: this runs for every decode of every step)
            p = seq.params
            limit = self.max_model_len if self.max_model_len is not None else 2**62
            if p.max_tokens is not None:
                limit = min(limit, seq.num_prompt_tokens + p.max_tokens)
            seq.length_limit = limit
        return len(seq.token_ids) + seq.num_pending >= limit

    def _admit(self, out: SchedulerOutput, slo_class: bool | None) -> None:
        """Admits waiting sequences in order, only when no running one was preempted for blocks."""
        bm = self.block_manager
        # While requests with targets keep arriving, best effort leaves them a few sequence slots, so
        # that they rarely need to preempt (a preempted sequence recomputes its whole prefix).
        room = self.max_num_seqs
        if slo_class is False and self._recent_slack:
            room -= self.max_num_seqs // 8
        while (not self._thrashing and self.waiting and self._budget > 0
               and len(self.running) < room):
            seq = self.waiting[0]
            if not self._in_class(seq, slo_class):
                break
            if seq.num_pending and self._ends(seq):
                # Preempted in this schedule (async scheduling) with a pending token that ends it: it
                # finishes once that token is processed; admitted again it would recompute its prefix
                # for a row whose token is dropped. (What waits behind it sorts after it.)
                break
            if seq.block_table:  # cannot happen: waiting sequences own no blocks
                raise RuntimeError(f"{seq!r} is waiting but owns blocks")
            cached = bm.match_prefix(seq)
            start = len(cached) * bm.block_size
            seq.num_computed_tokens = start  # what _chunk measures from (allocate_with_prefix sets it too)
            num_new = self._chunk(seq, slo_class)
            seq.num_computed_tokens = 0
            if num_new <= 0 or not bm.allocate_with_prefix(seq, cached, num_new):
                break
            req = seq.request
            if req.num_cached_tokens is None:
                # (a resumed sequence's cached blocks may reach past its prompt: usage counts prompt tokens)
                req.num_cached_tokens = min(len(cached) * bm.block_size, seq.num_prompt_tokens)
            self.waiting.pop(0)
            seq.num_draft_computed = seq.num_computed_tokens  # cached blocks hold the draft model's KV too
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_key)
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
            self._scheduled.add(seq.seq_id)
            self._charge(seq, seq.num_computed_tokens, num_new)

    def _step_time_cap(self, extend: bool = False) -> float | None:
        """Seconds of variable work this step may take (slo policy), less the step's fixed cost:
        - for each running decode with a TPOT target, the time until its next token is due (see
          TPOT_MARGIN; a decode that has banked time allows a longer step, up to TPOT_BANK targets);
        - while requests with TTFT targets are arriving (any in the last SLACK_WINDOW_S), the least
          slack one had (its target less its own prefill), times TTFT_SHARE: a request arriving
          mid-step waits for that step before its own prefill runs.
        With extend (schedule(), not admission's prediction), the most urgent prompt with a TTFT
        target may lengthen the step to finish in it, up to the decodes' TPOT_HARD dues; the loan
        is kept in _head_extra.
        Never below a quarter of the fixed cost, so best-effort work always makes some progress.
        None: neither applies (the token budget alone sizes the step)."""
        m = self.step_model
        fixed = float(m.coef[0]) + m.overhead_s
        now = self.clock()
        caps, hard, decodes = [], [], 0.0
        for s in self.running:
            slo = s.request.slo
            if slo is None or s.num_computed_tokens < s.num_prompt_tokens:
                continue
            decodes += m.row_cost(*row_features(1, s.num_computed_tokens, True))
            if slo.tpot_s is None:
                continue
            first = s.request.metrics.first_token_time
            n = max(1, s.num_tokens - s.num_prompt_tokens)  # (a pending token, async scheduling, counts)
            due = (first + n * slo.tpot_s * TPOT_MARGIN - now) if first is not None else slo.tpot_s * TPOT_MARGIN
            caps.append(min(due, TPOT_BANK * slo.tpot_s))
            hard.append(min((first + n * slo.tpot_s * TPOT_HARD - now) if first is not None else slo.tpot_s,
                            TPOT_BANK * slo.tpot_s))
        recent = self._recent_slack
        while recent and recent[0][0] < now - SLACK_WINDOW_S:
            recent.popleft()
        if recent:
            caps.append(max(2 * fixed, min(v for _, v in recent) * TTFT_SHARE))
        if not caps:
            return None
        cap = min(caps)
        head = self._urgent_prompt() if extend else None
        if head is not None and head.request.slo.ttft_s is not None:
            # The most urgent prompt with a TTFT target may take the whole step, beyond the share
            # kept for later arrivals and beyond the TPOT margin (as far as the running decodes'
            # banked time allows): split over several steps it pays their fixed cost each time.
            left = head.num_tokens - head.num_computed_tokens
            need = fixed + decodes + m.row_cost(*row_features(left, head.num_computed_tokens, True)) + 1e-6
            if need > cap:
                longer = max(cap, min([need, *hard]))
                self._head_extra = (head.seq_id, longer - cap)
                cap = longer
        return max(cap - fixed, 0.25 * fixed)

    def _urgent_prompt(self) -> Sequence | None:
        """The prompt with targets that runs first: one part-way through its prefill, else the
        first waiting one."""
        head = next((s for s in self.running if self.has_targets(s) and s.num_tokens - s.num_computed_tokens > 1),
                    None)
        return head if head is not None else next((s for s in self.waiting if self.has_targets(s)), None)

    def _make_room(self, out: SchedulerOutput) -> None:
        """Preempts best-effort sequences (lowest first) until the waiting requests with targets
        that this step could admit have the sequence slots and blocks for their first chunk."""
        bm = self.block_manager
        seqs = blocks = tokens = 0
        last = None
        reused: list[int] = []  # their cached prefixes: taken back from the cache, not fresh blocks
        for seq in self.waiting:
            if not self.has_targets(seq) or tokens >= self.max_num_batched_tokens:
                break
            if last is not None and self._time_left is not None:
                break  # with a step time cap, only the most urgent prompt is sure to be admitted (_chunk)
            cached = bm.match_prefix(seq)
            start = len(cached) * bm.block_size
            chunk = min(seq.num_tokens - start, self.max_num_batched_tokens - tokens)
            tokens += chunk
            seqs += 1
            blocks += bm.blocks_needed(start + chunk) - len(cached)
            reused += cached
            last = seq
        if last is None:
            return
        while len(self.running) + seqs > self.max_num_seqs or not bm.ensure_free(blocks, reused):
            # Only work that sorts after them (a better-priority best-effort sequence would be queued
            # again ahead of them and re-admitted: a preemption every step for nothing).
            victim = next((v for v in reversed(self.running)
                           if not self.has_targets(v) and v.sched_key > last.sched_key), None)
            if victim is None:
                return
            self._preempt(victim)
            out.preempted.append(victim)

    def admission_check(self, seq: Sequence) -> float | None:
        """The predicted TTFT (seconds from now) of a sequence with a TTFT target about to be
        queued: the prefill work of requests with targets queued before it, its own, and the
        steps they take beside the running decodes. None when it has no TTFT target."""
        slo = seq.request.slo
        if slo is None or slo.ttft_s is None:
            return None
        key = self.order(seq)
        m = self.step_model
        ahead = [s for s in self.waiting if self.has_targets(s) and s.sched_key < key]
        ahead += [s for s in self.running if self.has_targets(s) and s.num_tokens - s.num_computed_tokens > 1]
        tokens, done = self._prefill_left(seq)  # (a prompt's cached prefix is not computed again)
        work = m.row_cost(*row_features(tokens, done, True))
        for s in ahead:
            left, done = self._prefill_left(s, now=False)
            tokens += left
            work += m.row_cost(*row_features(left, done, True))
        # Each step also carries the running decodes (and its fixed cost); the prompts' own work once.
        decodes = sum(1 for s in self.running if s.num_tokens - s.num_computed_tokens <= 1)
        per_step = self.max_num_batched_tokens
        cap = self._step_time_cap()
        if cap is not None:  # steps sized for running targets take smaller chunks
            per_step = max(self.block_manager.block_size, min(per_step, self._fit_tokens(0, cap)))
        steps = max(1, math.ceil(tokens / per_step))
        return steps * (float(m.coef[0]) + m.overhead_s + decodes * m.row_cost(1.0, 1.0, 0.0)) + work

    def _add_drafts(self, out: SchedulerOutput, budget: int) -> None:
        """Speculative decoding: scheduled decodes take drafts from what is left once every running
        sequence has its token and waiting ones are admitted, so drafts never displace anything."""
        bm = self.block_manager
        for s in out.scheduled:
            if budget <= 0:
                break
            seq = s.seq
            if s.num_new_tokens != 1 or not s.completes or not seq.num_output_tokens:
                continue
            at_most = budget
            if self._time_left is not None:  # slo: drafts only in the time the step has left
                at_most = min(at_most, self._fit_tokens(seq.num_computed_tokens, max(0.0, self._time_left)))
                if at_most <= 0:
                    break
            k = self.propose(seq, at_most)
            if k and bm.allocate(seq, 1 + k, reclaim=False):  # (drafts never displace anything, holds neither)
                s.num_new_tokens += k
                s.num_spec = k
                budget -= k
                if self._time_left is not None:
                    self._time_left -= self.step_model.row_cost(*row_features(k, seq.num_computed_tokens, False))

    def _attach_forks(self, out: SchedulerOutput) -> None:
        """Chunks that complete a prompt whose request has samples waiting take them along, as
        many as max_num_seqs leaves room for; the rest are queued to run on their own."""
        if not self.fork_waiting:
            return
        for s in out.scheduled:
            sibs = self.fork_waiting.get(s.seq.seq_id)
            if sibs is None or not s.completes or s.seq.num_output_tokens:
                continue
            del self.fork_waiting[s.seq.seq_id]
            room = max(0, self.max_num_seqs - len(self.running) - sum(len(x.forks) for x in out.scheduled))
            s.forks = sibs[:room]
            for sib in sibs[room:]:
                self.add(sib)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_draft_computed = 0
        seq.beam_candidates = None  # recomputed once it runs again
        seq.num_preemptions += 1
        seq.preempted_at_tokens = seq.num_tokens
        self.num_preemptions += 1
        self.add(seq)

    def advance(self, out: SchedulerOutput) -> None:
        """Marks the scheduled chunks as computed (their KV is now in the cache), offers their
        full blocks to the prefix cache, and forks waiting samples off completed prompts."""
        bm = self.block_manager
        finished = SeqStatus.FINISHED
        for s in out.scheduled:
            seq = s.seq
            if seq.status is finished:  # (async scheduling: it ended while the step was in flight)
                continue
            if s.start < seq.num_prompt_tokens:
                self.num_prompt_tokens_computed += min(s.start + s.num_new_tokens, seq.num_prompt_tokens) - s.start
            seq.num_computed_tokens = s.start + s.num_new_tokens - s.num_spec
            self._register(seq)
            for sib in s.forks:
                if sib.is_finished:  # (aborted or failed since the step was scheduled)
                    continue
                bm.fork(seq, sib)
                sib.num_draft_computed = seq.num_draft_computed
                sib.status = SeqStatus.RUNNING
                sib.sched_key = self.order(sib)
                bisect.insort(self.running, sib, key=_key)

    def accept(self, seq: Sequence, num_drafts: int) -> None:
        """After verification appended num_drafts accepted drafts to a running sequence: their KV
        (written by this step's chunk) now counts as computed. The draft model's KV past them was
        for rejected tokens."""
        seq.num_computed_tokens += num_drafts
        seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
        self._register(seq)

    def _register(self, seq: Sequence) -> None:
        upto = min(seq.num_computed_tokens, seq.num_draft_computed) if self.draft_kv else None
        self.block_manager.register_computed(seq, upto)
