"""The model runner's persistent batch: what it keeps about each running sequence between steps.

A sequence takes a row when it is first scheduled and keeps it until the scheduler frees its
blocks (it finished, was aborted or preempted: `SchedulerOutput.freed_seq_ids`, which the engine
hands to `release` right after scheduling, whether or not the step runs). The row holds
its block table and its sampling parameters as numpy arrays, so a step does not rebuild them
from Python lists:

- block tables are updated incrementally. Entries for blocks that lie wholly before a chunk's
  first position never change while a sequence holds its blocks (they are full and computed;
  copy-on-write only ever replaces the block the next write lands in), so each step copies
  only the entries from `start // block_size` on: one or two for a decode. A table the block
  manager replaced (a fork, an admission with cached blocks, a beam re-seated) is a new list
  object, and the row is synced whole;
- a step's inputs (token ids, positions, cache slots, query start locations, context lengths,
  the step's block tables gathered from the rows) are computed with numpy and written into one
  pinned host buffer, which reaches the device in one asynchronous copy (`Staging`); on a CPU
  the tensors are views of that buffer and nothing is copied;
- sampling parameters are columns indexed by row (`SamplingColumns`): a step gathers the
  columns of its sampled rows; only rows that need per-row work (a seed, logit_bias, min_tokens,
  penalties, a grammar, a reasoning budget, logprobs, beam search) are visited in Python.

vLLM's GPU model runner keeps an input batch of the same kind (its InputBatch / BlockTable).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention import AttentionMetadata
from tokenmill.engine.sequence import Sequence

logger = logging.getLogger(__name__)

ALIGN = 16


class Staging:
    """One host buffer (pinned where CUDA is) that a step's small arrays are written into, and
    that reaches the device in one asynchronous copy. The next use waits for that copy, so the
    buffer is never overwritten under a transfer still in flight."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pin = device.type == "cuda"
        self._pack = device.type != "cpu"  # (tests set it on a CPU to check the packing)
        self._host = torch.empty(0, dtype=torch.uint8)
        self._host_np = self._host.numpy()
        self._event: torch.cuda.Event | None = None

    def _reserve(self, nbytes: int) -> None:
        if self._host.numel() >= nbytes:
            return
        size = max(nbytes, 2 * self._host.numel(), 1 << 16)
        try:
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
        except RuntimeError:  # no page-locked memory to be had: pageable, the copy is then synchronous
            logger.warning("staging buffer: pinned memory unavailable, using pageable memory")
            self._pin = False
            self._host = torch.empty(size, dtype=torch.uint8)
        self._host_np = self._host.numpy()

    def __call__(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The arrays as tensors on the device (int64, float32 or bool; shapes kept). On a CPU they
        are the arrays themselves (a step's arrays are its own: nothing aliases a later step's)."""
        if not self._pack:
            return [torch.from_numpy(a) for a in arrays]
        offsets, end = [], 0
        for a in arrays:
            offsets.append(end)
            # 16-byte aligned: Triton compiles a kernel once per pattern of its pointers' alignment
            # to 16 bytes (its JIT's specialisation), and views whose alignment changed with the
            # lengths before them would compile new variants mid-serving.
            end += -(-a.nbytes // ALIGN) * ALIGN
        if self._event is not None:
            self._event.synchronize()  # the previous copy out of the buffer has finished
            self._event = None
        self._reserve(end)
        host = self._host_np
        for a, off in zip(arrays, offsets):
            host[off : off + a.nbytes].view(a.dtype)[:] = a.reshape(-1)
        buf = self._host[:end]
        if self.device.type != "cpu":
            buf = buf.to(self.device, non_blocking=True)
        if self._pin:
            self._event = torch.cuda.Event()
            self._event.record()
        out = []
        for a, off in zip(arrays, offsets):
            t = buf[off : off + a.nbytes].view(_TORCH_DTYPE[a.dtype.str])
            out.append(t.view(a.shape) if a.ndim != 1 else t)
        return out


_TORCH_DTYPE = {np.dtype(np.int64).str: torch.int64, np.dtype(np.float32).str: torch.float32,
                np.dtype(np.bool_).str: torch.bool, np.dtype(np.int32).str: torch.int32}


USES_GREEDY, USES_TOP_K, USES_TOP_P, USES_MIN_P = 1, 2, 4, 8
USES_REPETITION, USES_PRESENCE, USES_FREQUENCY, USES_SPECIAL, USES_LOGPROBS = 16, 32, 64, 128, 256


@dataclass
class SamplingColumns:
    """Sampling parameters as one array per parameter, a row per sequence (or logits row)."""

    greedy: np.ndarray  # bool
    temperature: np.ndarray  # float32, 1 where greedy
    top_k: np.ndarray  # int64, 0: none (greedy rows: 0)
    top_p: np.ndarray  # float32, 1: none
    min_p: np.ndarray  # float32, 0: none
    repetition_penalty: np.ndarray  # float32, 1: none
    presence_penalty: np.ndarray  # float32
    frequency_penalty: np.ndarray  # float32
    logprobs: np.ndarray  # int64, -1: not asked for
    uses: np.ndarray  # int64: the USES_* bits of what the row's parameters use, so that a batch's
    # needs are two reductions (an OR: some row uses it; an AND: every row is greedy); USES_SPECIAL:
    # the row needs per-row work (see `needs_row_work`)

    FIELDS = ("greedy", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "logprobs", "uses")

    @classmethod
    def empty(cls, n: int) -> SamplingColumns:
        return cls(np.zeros(n, np.bool_), np.ones(n, np.float32), np.zeros(n, np.int64), np.ones(n, np.float32),
                   np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32),
                   np.full(n, -1, np.int64), np.zeros(n, np.int64))

    @classmethod
    def of(cls, seqs: list[Sequence]) -> SamplingColumns:
        cols = cls.empty(len(seqs))
        for i, s in enumerate(seqs):
            cols.set(i, s)
        return cols

    def set(self, i: int, seq: Sequence) -> None:
        p = seq.params
        g = p.greedy
        self.greedy[i] = g
        self.temperature[i] = 1.0 if g else p.temperature
        # (top_k past the vocabulary means none; from_columns compares with the vocabulary size)
        self.top_k[i] = 0 if g or not p.top_k or p.top_k < 0 else min(p.top_k, 2**62)
        self.top_p[i] = 1.0 if g else p.top_p
        self.min_p[i] = 0.0 if g else p.min_p
        self.repetition_penalty[i] = p.repetition_penalty
        self.presence_penalty[i] = p.presence_penalty
        self.frequency_penalty[i] = p.frequency_penalty
        self.logprobs[i] = -1 if p.logprobs is None else p.logprobs
        special = needs_row_work(seq)
        self.uses[i] = (USES_GREEDY * g | USES_TOP_K * bool(self.top_k[i]) | USES_TOP_P * bool(self.top_p[i] < 1.0)
                        | USES_MIN_P * bool(self.min_p[i] > 0.0)
                        | USES_REPETITION * (p.repetition_penalty != 1.0) | USES_PRESENCE * (p.presence_penalty != 0.0)
                        | USES_FREQUENCY * (p.frequency_penalty != 0.0) | USES_SPECIAL * special
                        | USES_LOGPROBS * (p.logprobs is not None))

    def rows_with(self, bits: int) -> list[int]:
        """The rows that use any of these USES_* bits."""
        return np.flatnonzero(self.uses & bits).tolist()

    def take(self, rows: np.ndarray) -> SamplingColumns:
        return SamplingColumns(*(getattr(self, f)[rows] for f in self.FIELDS))

    def grow(self, n: int) -> None:
        fresh = SamplingColumns.empty(n)
        for f in self.FIELDS:
            old = getattr(self, f)
            new = getattr(fresh, f)
            new[: len(old)] = old
            setattr(self, f, new)


def needs_row_work(seq: Sequence) -> bool:
    """Whether sampling this sequence needs more than its columns: a generator of its own (seed),
    logit_bias, min_tokens and bad_words bans, repetition penalties (its token counts), a grammar's or
    allowed_token_ids' mask, tokens a
    reasoning budget forces, or beam search."""
    p = seq.params
    return (p.seed is not None or bool(p.logit_bias) or p.min_tokens > 0 or p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or seq.matcher is not None
            or bool(p.allowed_token_ids) or bool(p._bad_words_token_ids)
            or p.max_reasoning_tokens is not None or seq.request.beam is not None)


class InputBatch:
    """Rows of the running sequences (see the module's docstring)."""

    def __init__(self, block_size: int, max_blocks: int, device: torch.device, capacity: int = 16) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.device = device
        self.rows: dict[int, int] = {}  # seq_id -> row
        self._free: list[int] = []
        self._tables: list[list[int] | None] = []  # the block-table list each row mirrors
        self._synced: list[int] = []  # entries of the row's table written so far
        self.block_table = np.zeros((0, max_blocks), np.int64)
        self.columns = SamplingColumns.empty(0)
        self.staging = Staging(device)  # a step's inputs
        self.sample_staging = Staging(device)  # its sampling parameters (built after the forward is queued)
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = len(self._tables)
        table = np.zeros((capacity, self.max_blocks), np.int64)
        table[:old] = self.block_table
        self.block_table = table
        self.columns.grow(capacity)
        self._tables += [None] * (capacity - old)
        self._synced += [0] * (capacity - old)
        self._free += list(range(capacity - 1, old - 1, -1))  # lowest rows first (popped from the end)

    def __len__(self) -> int:
        return len(self.rows)

    def release(self, seq_ids: Iterable[int]) -> None:
        """Frees the rows of sequences whose blocks were freed."""
        for sid in seq_ids:
            row = self.rows.pop(sid, None)
            if row is not None:
                self.block_table[row, : self._synced[row]] = 0
                self._tables[row] = None
                self._synced[row] = 0
                self._free.append(row)

    def sync(self, seq: Sequence, start: int) -> int:
        """The sequence's row, its block table brought up to date for a chunk from `start`."""
        row = self.rows.get(seq.seq_id)
        table = seq.block_table
        if row is None:
            if not self._free:
                self._grow(2 * len(self._tables))
            row = self._free[-1]
            self.columns.set(row, seq)  # first: if it raises, the row stays free (and holds no one's values)
            self._free.pop()
            self.rows[seq.seq_id] = row
        if self._tables[row] is not table:  # new, or the block manager gave it another table
            n = len(table)
            stale = self._synced[row]
            if stale > n:
                self.block_table[row, n:stale] = 0
            self.block_table[row, :n] = table
            self._tables[row] = table
            self._synced[row] = n
            return row
        first = start // self.block_size  # earlier entries are full blocks: they never change
        n = len(table)
        if n - first == 1:
            self.block_table[row, first] = table[first]
        elif n > first:
            self.block_table[row, first:n] = table[first:n]
        self._synced[row] = max(self._synced[row], n)
        return row

    def build(self, input_ids: list[int], rows: list[int], starts: list[int], counts: list[int],
              num_decodes: int, head_rows: list[int],
              fill: tuple[list[int], list[int], torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """A step's model inputs and varlen metadata for chunks (row, first position, tokens) in
        order, decodes first; input_ids are the chunks' tokens, concatenated. head_rows (the rows
        that get logits) come along in the same copy. fill (async scheduling) is (positions in
        input_ids, rows of `tokens`, tokens): input ids that are tokens the previous step sampled,
        still on the device, copied there without the host waiting for them."""
        bs = self.block_size
        r = np.array(rows, np.int64)
        start = np.array(starts, np.int64)
        n = np.array(counts, np.int64)
        b = len(rows)
        qsl = np.zeros(b + 1, np.int64)
        np.cumsum(n, out=qsl[1:])
        seq_lens = start + n
        total = int(qsl[-1])
        if total == b:  # decodes only: one row each
            positions, token_rows = start, r
        else:
            positions = np.repeat(start - qsl[:-1], n) + np.arange(total, dtype=np.int64)
            token_rows = np.repeat(r, n)
        slots = self.block_table[token_rows, positions // bs] * bs + positions % bs
        max_seq_len = int(seq_lens.max()) if b else 0
        width = max(1, -(-max_seq_len // bs))
        tables = self.block_table[r, :width]
        ids = np.array(input_ids, np.int64)
        arrays = [ids, positions, slots, qsl, seq_lens, tables, np.array(head_rows, np.int64)]
        if fill is not None:
            arrays += [np.array(fill[0], np.int64), np.array(fill[1], np.int64)]
        ids_t, pos_t, slots_t, qsl_t, lens_t, tables_t, head_t, *where = self.staging(arrays)
        if fill is not None:
            ids_t[where[0]] = fill[2][where[1]]
        meta = AttentionMetadata(
            slot_mapping=slots_t, query_start_loc=qsl_t, seq_lens=lens_t, block_tables=tables_t,
            num_decodes=num_decodes, max_query_len=int(n.max()) if b else 0, max_seq_len=max_seq_len, block_size=bs,
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist())
        return ids_t, pos_t, meta, head_t
