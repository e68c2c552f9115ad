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

Samples of one request (n > 1) share their prompt: only sample 0 is queued; the others wait
(FORK_WAITING) until the step that completes sample 0's prompt. That step samples a first
token for each of them from the same logits row, and `advance` forks them onto sample 0's
blocks, so the prompt is prefilled once. Samples that would push the batch past
max_num_seqs are queued as ordinary sequences instead (they then reuse the prompt's full
blocks through the prefix cache).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # num_computed_tokens when scheduled: the chunk covers [start, start + num_new_tokens)
    # Samples of the same request that fork off this chunk's logits row (it completes the prompt).
    forks: list[Sequence] = field(default_factory=list)
    num_spec: int = 0  # draft tokens after the last token (seq.spec_token_ids[:num_spec]), in num_new_tokens

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        return self.start + self.num_new_tokens - self.num_spec == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the step runs

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 propose: Callable[[Sequence, int], int] | None = None) -> None:
        self.block_manager = block_manager
        # Speculative decoding: propose(seq, at_most) readies up to at_most drafts for a decode and
        # says how many (they go in seq.spec_token_ids, or the runner fills them in).
        self.propose = propose
        # With a draft model, a block goes to the prefix cache only once the draft's KV covers it too.
        self.draft_kv = False
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.fork_waiting: dict[int, list[Sequence]] = {}  # sample 0's seq_id -> samples waiting for it
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0  # prompt positions run through the model (cache hits and forks excluded)

    # -- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

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
            sibs = self.fork_waiting[leader]
            sibs.remove(seq)
            if not sibs:
                del self.fork_waiting[leader]
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
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
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        bm.take_copies()  # copies left by a schedule() that raised never ran; their blocks are gone

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.beam_candidates is not None:  # a beam waiting for its request's other beams
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq, num_new):
                victim = self.running[-1]  # lowest priority, never one already scheduled
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
                budget -= num_new
                i += 1

        # Admit waiting sequences only when nothing had to be preempted this step.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.block_table:  # cannot happen: waiting sequences own no blocks
                raise RuntimeError(f"{seq!r} is waiting but owns blocks")
            cached = bm.match_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.allocate_with_prefix(seq, cached, num_new):
                break
            req = seq.request
            if req.num_cached_tokens is None:
                # (a resumed sequence's cached blocks may reach past its prompt: usage counts prompt tokens)
                req.num_cached_tokens = min(len(cached) * bm.block_size, seq.num_prompt_tokens)
            self.waiting.pop(0)
            seq.num_draft_computed = seq.num_computed_tokens  # cached blocks hold the draft model's KV too
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=Sequence.sort_key)
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
            budget -= num_new
        if not out.scheduled and not out.preempted and self.waiting:
            # Only waiting beams whose request's other beams hold the blocks they need: free the
            # lowest-priority waiting beam so the next step can admit (no step may stall for good).
            parked = [s for s in self.running if s.beam_candidates is not None]
            if parked:
                self._preempt(parked[-1])
                out.preempted.append(parked[-1])
        if self.propose is not None and not out.preempted:
            self._add_drafts(out, budget)
        self._attach_forks(out)
        out.block_copies = bm.take_copies()
        return out

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
            k = self.propose(seq, budget)
            if k and bm.allocate(seq, 1 + k):
                s.num_new_tokens += k
                s.num_spec = k
                budget -= k

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
        for s in out.scheduled:
            seq = s.seq
            self.num_prompt_tokens_computed += max(0, min(s.start + s.num_new_tokens, seq.num_prompt_tokens) - s.start)
            seq.num_computed_tokens = s.start + s.num_new_tokens - s.num_spec
            self._register(seq)
            for sib in s.forks:
                bm.fork(seq, sib)
                sib.num_draft_computed = seq.num_draft_computed
                sib.status = SeqStatus.RUNNING
                bisect.insort(self.running, sib, key=Sequence.sort_key)

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
