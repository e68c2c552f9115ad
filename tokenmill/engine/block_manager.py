"""Paged KV cache bookkeeping: which physical blocks each sequence owns.

No tensors here: the model runner owns the cache memory, this class only hands out block
numbers. Blocks are reference counted so that later features (prefix caching, parallel
samples sharing a prompt, beam search) can share a block between sequences; a block
returns to the free list when its count reaches zero.
"""

from __future__ import annotations

from collections import deque

from tokenmill.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0 when idle (the kv_cache_usage_perc metric)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, self.blocks_needed(total) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grows seq's block table to hold its computed tokens plus num_new_tokens. All or nothing."""
        need = self.num_new_blocks(seq, num_new_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.popleft()
            assert self.ref_counts[block] == 0, f"block {block} on the free list is in use"
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares all of parent's blocks (copy-on-write is the caller's business)."""
        if child.block_table:
            raise ValueError("fork: child already owns blocks")
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence) -> None:
        """Releases seq's references; safe to call twice (the second call finds an empty table)."""
        for block in reversed(seq.block_table):
            count = self.ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"double free of block {block} by {seq!r}")
            self.ref_counts[block] = count - 1
            if count == 1:
                self._free.append(block)
        seq.block_table = []

    def check_invariants(self, live: list[Sequence]) -> None:
        """For tests: counts equal the number of live tables holding each block; free list is exact."""
        expected = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                expected[block] += 1
        if expected != self.ref_counts:
            raise AssertionError("block reference counts disagree with live block tables")
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if free != {b for b in range(self.num_blocks) if expected[b] == 0}:
            raise AssertionError("free list differs from the unreferenced blocks")
