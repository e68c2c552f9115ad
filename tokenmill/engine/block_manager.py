"""Paged KV cache bookkeeping: which physical blocks each sequence owns, and the prefix cache.

No tensors here: the model runner owns the cache memory, this class only hands out block
numbers. Blocks are reference counted; a block is in exactly one of three states:

- used: referenced by one or more live block tables (ref count > 0);
- cached: unreferenced, but its full contents are known by hash and can be reused
  (`_evictable`, least recently used first);
- free: unreferenced, nothing worth keeping (`_free`).

Prefix caching: a full block's key is sha256(parent key || its token ids || extra keys),
with the cache salt as the extra key of a sequence's first block, so a key names the whole
prefix up to the end of its block. Sha256 rather than Python's hash(): keys are stable across
processes (a router or a prefill worker can compute the same keys from token ids alone) and a
collision is as unlikely as a sha256 collision, so a hit needs no comparison of token ids. It
costs about a microsecond per 16-token block. Only full blocks whose KV has been computed are
registered; a fresh block is taken from the free list first and only then by evicting the
least recently used cached block.

Copy-on-write: `fork` shares every block of a sequence, including a partly filled last one.
Before a sequence writes into a partly filled block that another table also references, it
gets a fresh block and a (src, dst) copy is queued for the runner (`take_copies`), so no
sequence ever writes into a block another reads. Full blocks are never written again.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable

from tokenmill.engine.sequence import Sequence

_ROOT_KEY = hashlib.sha256(b"tokenmill prefix cache v1").digest()


def hash_block(parent: bytes, token_ids: list[int], extra: bytes = b"") -> bytes:
    """The key of a full block: the parent key (32 bytes), then the block's token ids as little-endian int64,
    then extra keys. The first two parts have fixed sizes, so the encoding is unambiguous."""
    h = hashlib.sha256(parent)
    ids = array("q", token_ids)
    if sys.byteorder == "big":  # little-endian everywhere, so every machine computes the same keys
        ids.byteswap()
    h.update(ids.tobytes())
    h.update(extra)
    return h.digest()


def salt_key(salt: str | None) -> bytes:
    return b"" if salt is None else b"salt:" + salt.encode("utf-8")


def block_hashes(token_ids: list[int], block_size: int, salt: str | None = None) -> list[bytes]:
    """Keys of every full block of a token sequence (what a KV-aware router would compute)."""
    out: list[bytes] = []
    parent = _ROOT_KEY
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], salt_key(salt) if i == 0 else b"")
        out.append(parent)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._freed: list[int] = []  # seq ids whose tables free() emptied (take_freed)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached and unreferenced, LRU first
        self._cached: dict[bytes, int] = {}  # block key -> block
        self._block_key: list[bytes | None] = [None] * num_blocks
        self._copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        # Prefix cache counters, in tokens (as vLLM counts them): looked up and found.
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0
        # KV events for a fleet router (None: not recorded): ("stored" | "removed", key) and
        # ("cleared", None), in the order they happened; the server drains them after each step.
        self.events: list[tuple[str, bytes | None]] | None = None
        # References kept only in case (LLMEngine: KV held for a transfer), which give way when an
        # allocation would fail without them: before a scheduler preempts a running sequence or leaves
        # a prompt waiting. reclaimable() lists them, oldest first, as (id, block table); reclaim(id)
        # lets one go.
        self.reclaimable: Callable[[], list[tuple[str, list[int]]]] | None = None
        self.reclaim: Callable[[str], None] | None = None

    def record_events(self) -> list[bytes]:
        """Starts recording KV events; returns the keys cached now (the snapshot they follow)."""
        if self.events is None:
            self.events = []
        return list(self._cached)

    def take_events(self) -> list[tuple[str, bytes | None]]:
        events, self.events = self.events, ([] if self.events is not None else None)
        return events or []

    # -- state ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: free plus cached-but-unreferenced (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        """Unreferenced blocks that still hold a reusable prefix."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences, 0 when idle (kv_cache_usage_perc)."""
        return self.num_used_blocks / self.num_blocks

    def ensure_free(self, need: int, reused: list[int] | tuple[int, ...] = ()) -> bool:
        """Whether need blocks are free besides the free ones among reused (blocks an allocation
        takes back from the prefix cache); when they are not, reclaimable holds give way: taken the
        oldest first until they make enough room (else none goes: a hold let go for nothing would
        leave its blocks to eviction), then only those of them needed for it (kept again the newest
        first), never one that frees nothing besides reused blocks."""
        keep = set(reused)  # (several prompts may reuse one prefix)
        short = need - (self.num_free_blocks - sum(1 for b in keep if self.ref_counts[b] == 0))
        if short <= 0:
            return True
        if self.reclaimable is None or self.reclaim is None:
            return False
        # Holds are taken oldest first until the blocks whose every reference they hold make up the
        # shortfall (counted across holds: one prompt imported twice frees its blocks only with both
        # holds gone); then those not needed for it are kept again, the newest first (a hold let go
        # un-frees exactly its own blocks among the freed ones).
        dropped: dict[int, int] = {}  # block -> references the holds taken drop
        freed: set[int] = set()
        taken: list[tuple[str, list[int]]] = []
        for hid, table in self.reclaimable():
            taken.append((hid, table))
            for b in table:
                dropped[b] = dropped.get(b, 0) + 1
                if dropped[b] == self.ref_counts[b] and b not in keep:
                    freed.add(b)
            if len(freed) >= short:
                for i in range(len(taken) - 1, -1, -1):
                    own = freed.intersection(taken[i][1])
                    if len(freed) - len(own) >= short:
                        freed -= own
                        del taken[i]
                for h, _ in taken:
                    self.reclaim(h)
                return True
        return False

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- hashing --------------------------------------------------------------------------------
    def _extend_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Makes seq.block_hashes cover the full blocks among its first num_tokens tokens."""
        bs = self.block_size
        hashes = seq.block_hashes
        # (only tokens known on the host: a pending token's block is hashed once it is appended)
        for i in range(len(hashes), min(num_tokens, len(seq.token_ids)) // bs):
            parent = hashes[-1] if hashes else _ROOT_KEY
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs],
                                     salt_key(seq.cache_salt) if i == 0 else b""))

    # -- prefix cache ---------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq's tokens. Changes nothing. At least the
        last token is left out, so the step that completes the sequence has logits to sample."""
        if not self.enable_prefix_caching or not seq.uses_prefix_cache or seq.block_table:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks * self.block_size)
        return self.cached_prefix(seq.block_hashes[:max_blocks])

    def cached_prefix(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of a chain of keys. Changes nothing."""
        blocks = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register_computed(self, seq: Sequence, upto: int | None = None) -> None:
        """Offers seq's newly computed full blocks (within its first `upto` tokens, default all
        computed ones) to the cache, after a step wrote their KV. A block whose key is already
        cached (two sequences computed the same prefix at once) stays private and is freed plainly."""
        if not self.enable_prefix_caching:
            return
        computed = seq.num_computed_tokens if upto is None else min(upto, seq.num_computed_tokens)
        # A block holding a pending token (async scheduling) has no hash yet: offered once it is known.
        computed = min(computed, len(seq.token_ids))
        full = min(computed // self.block_size, len(seq.block_table))
        if seq.num_registered_blocks >= full:
            return
        self._extend_hashes(seq, full * self.block_size)
        for i in range(seq.num_registered_blocks, full):
            key, block = seq.block_hashes[i], seq.block_table[i]
            if key not in self._cached and self._block_key[block] is None:
                self._cached[key] = block
                self._block_key[block] = key
                if self.events is not None:
                    self.events.append(("stored", key))
        seq.num_registered_blocks = full

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (blocks in use keep their contents, just not their keys)."""
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        self._cached.clear()
        self._block_key = [None] * self.num_blocks
        if self.events is not None:
            self.events.append(("cleared", None))

    # -- allocation -----------------------------------------------------------------------------
    def _needs_copy(self, seq: Sequence) -> bool:
        """True when seq's next write lands in a partly filled block another table references."""
        pos = seq.num_computed_tokens
        if pos % self.block_size == 0:
            return False
        idx = pos // self.block_size
        return idx < len(seq.block_table) and self.ref_counts[seq.block_table[idx]] > 1

    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently used cached block
            block, _ = self._evictable.popitem(last=False)
            key = self._block_key[block]
            self._block_key[block] = None
            if key is not None and self._cached.get(key) == block:
                del self._cached[key]
                if self.events is not None:
                    self.events.append(("removed", key))
            self.num_evictions += 1
        assert self.ref_counts[block] == 0, f"block {block} on the free list is in use"
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._evictable[block]  # a cached block becomes used again
        self.ref_counts[block] += 1

    def allocate(self, seq: Sequence, num_new_tokens: int, reclaim: bool = True) -> bool:
        """Grows seq's block table to hold its computed tokens plus num_new_tokens (copying a
        shared, partly filled last block first). All or nothing; reclaim=False: holds keep their
        blocks (an allocation that may as well not happen, as a speculative draft's)."""
        pos, table = seq.num_computed_tokens, seq.block_table
        if num_new_tokens == 1 and pos // self.block_size < len(table):
            # A decode whose slot is in a block it holds (the common case): nothing to take, and a
            # copy only when that block is partly filled and shared (as _needs_copy says).
            if pos % self.block_size == 0 or self.ref_counts[table[pos // self.block_size]] <= 1:
                return True
        grow = max(0, self.blocks_needed(pos + num_new_tokens) - len(table))
        copy = self._needs_copy(seq)
        need = grow + copy
        if need > self.num_free_blocks:
            if not reclaim or not self.ensure_free(need):
                return False
            copy = self._needs_copy(seq)  # (a reclaimed hold may have shared the last block)
            need = grow + copy
        if copy:
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            dst = self._take_fresh()
            self.ref_counts[src] -= 1  # still > 0: another table holds it
            seq.block_table[idx] = dst
            self._copies.append((src, dst))
            need -= 1
        for _ in range(need):
            seq.block_table.append(self._take_fresh())
        return True

    def allocate_with_prefix(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Admission: seq (owning no blocks yet) takes the cached prefix blocks from match_prefix,
        then fresh blocks for num_new_tokens after them. All or nothing; counts the lookup."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        cached_tokens = len(cached) * self.block_size
        need = self.blocks_needed(cached_tokens + num_new_tokens) - len(cached)
        if not self.ensure_free(need, cached):  # (cached's free blocks leave the evictable pool: not free)
            return False
        for block in cached:
            self._ref(block)
        seq.block_table = list(cached)
        seq.num_computed_tokens = cached_tokens
        seq.num_registered_blocks = len(cached)
        for _ in range(need):
            seq.block_table.append(self._take_fresh())
        if self.enable_prefix_caching and seq.uses_prefix_cache:
            self.num_query_tokens += seq.num_tokens
            self.num_hit_tokens += cached_tokens
        return True

    def take_imports(self, keys: list[bytes], first: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """KV transfer (engine/kv_transfer.py): a fresh block for each key from keys[first:] not
        cached yet, in order, as many as are free (a block of the prefix that does not fit makes
        the rest useless); keys[:first] are a prefix sent without KV, only held if cached. The new
        blocks and the cached ones among keys (the prefix the new ones continue) are held until
        release_imports, so taking a block never evicts a block of the same chain. Returns
        [(index into keys, new block)] and [(index into keys, cached block held)]."""
        taken: list[tuple[int, int]] = []
        held: list[tuple[int, int]] = []
        if not self.enable_prefix_caching:
            return taken, held
        for i, key in enumerate(keys):  # (first: a fresh block must not evict one of them)
            block = self._cached.get(key)
            if block is not None:
                self._ref(block)
                held.append((i, block))
        for i in range(first, len(keys)):
            if keys[i] in self._cached:
                continue
            if self.num_free_blocks == 0:
                break
            taken.append((i, self._take_fresh()))
        return taken, held

    def release_imports(self, keys: list[bytes], taken: list[tuple[int, int]], held: list[tuple[int, int]],
                        written: bool) -> None:
        """Imported blocks whose KV is written (written) join the cache under their keys, and the
        cached blocks take_imports held are let go: all of the chain in one pass from its last
        block to its first, so the least recently used end evicts a prefix's tail before the
        blocks it depends on. Unwritten blocks go back to the free list."""
        chain = sorted([(i, block, True) for i, block in taken] + [(i, block, False) for i, block in held],
                       key=lambda x: x[0], reverse=True)
        for i, block, new in chain:
            self.ref_counts[block] -= 1
            if not new:
                if self.ref_counts[block] == 0:
                    self._evictable[block] = None  # (cached: it has a key)
                continue
            key = keys[i]
            if written and key not in self._cached:
                self._cached[key] = block
                self._block_key[block] = key
                self._evictable[block] = None
                if self.events is not None:
                    self.events.append(("stored", key))
            else:
                self._free.append(block)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self._copies = self._copies, []
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares all of parent's blocks; a write into a shared partly filled block copies it."""
        if child.block_table:
            raise ValueError("fork: child already owns blocks")
        for block in parent.block_table:
            self._ref(block)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        n = min(len(parent.block_hashes), parent.num_computed_tokens // self.block_size)
        child.block_hashes = parent.block_hashes[:n]
        child.num_registered_blocks = min(parent.num_registered_blocks, n)

    def free(self, seq: Sequence) -> None:
        """Releases seq's references; safe to call twice (the second call finds an empty table).
        Cached blocks stay findable; the last block of a table is released first, so it is
        evicted before the blocks its key depends on."""
        for block in reversed(seq.block_table):
            count = self.ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"double free of block {block} by {seq!r}")
            self.ref_counts[block] = count - 1
            if count == 1:
                if self._block_key[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        if seq.block_table:
            self._freed.append(seq.seq_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def take_freed(self) -> list[int]:
        """Ids of the sequences whose blocks were freed since the last call (the model runner
        releases their rows of its persistent batch)."""
        freed, self._freed = self._freed, []
        return freed

    # -- checks ---------------------------------------------------------------------------------
    def check_invariants(self, live: list[Sequence]) -> None:
        """For tests: counts equal the live tables; every block is exactly one of free, cached or
        used; the key index matches the blocks' keys."""
        expected = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                expected[block] += 1
        if expected != self.ref_counts:
            raise AssertionError("block reference counts disagree with live block tables")
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        evictable = set(self._evictable)
        if free & evictable:
            raise AssertionError("a block is both free and cached")
        if free | evictable != {b for b in range(self.num_blocks) if expected[b] == 0}:
            raise AssertionError("free + cached blocks differ from the unreferenced blocks")
        if len(free) + len(evictable) + sum(1 for c in expected if c > 0) != self.num_blocks:
            raise AssertionError("free + cached + used != total")
        if any(self._block_key[b] is not None for b in free):
            raise AssertionError("a free block still has a cache key")
        if any(self._block_key[b] is None for b in evictable):
            raise AssertionError("a cached free block has no key")
        if {b: k for k, b in self._cached.items()} != {b: k for b, k in enumerate(self._block_key) if k is not None}:
            raise AssertionError("the key index disagrees with the blocks' keys")
        for seq in live:
            if seq.num_registered_blocks > len(seq.block_table):
                raise AssertionError("more registered blocks than the table holds")
            n = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
            for i in range(min(n, len(seq.block_table))):
                key = self._block_key[seq.block_table[i]]
                if key is not None and key != seq.block_hashes[i]:
                    raise AssertionError(f"block {seq.block_table[i]} is cached under another prefix")
