"""Continuous batching with one token budget per step.

There is no prefill phase and no decode phase: every sequence has tokens and a count of
tokens whose KV is already cached, and each step hands out up to
`max_num_batched_tokens` new tokens. Running sequences go first (a decode costs one
token, an unfinished prompt takes a chunk of whatever budget is left), then waiting
sequences are admitted in priority order. When the cache runs out of blocks, the
lowest-priority running sequence is preempted by recompute: its blocks are freed and it
returns to the waiting queue with 0 computed tokens, keeping its generated tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # num_computed_tokens when scheduled: the chunk covers [start, start + num_new_tokens)

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence (finished or aborted) from the queues and frees its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
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
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.allocate(seq, num_new):
                break
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=Sequence.sort_key)
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def advance(self, out: SchedulerOutput) -> None:
        """Marks the scheduled chunks as computed (their KV is now in the cache)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
