"""KV events: what each model's prefix cache holds, published for a fleet router.

A router that knows which replica caches which prefix blocks can send a request where its
prompt is already computed (tokenmill/router). The block manager records each full block
offered to the cache ("stored"), each cached block evicted ("removed") and each reset
("cleared"), keyed by the same chained sha256 a router computes from token ids
(block_manager.block_hashes). Recording starts when the first subscriber arrives: the engine
thread then hands the hub the keys cached at that moment and, after every step, the events since,
both through the event loop's queue in order, so the hub's mirror of the cache is exact.

One hub per model (it outlives the model's engine: a model loaded again from disk starts with a
fresh snapshot). Each subscriber has a bounded queue; one that falls behind is dropped, and a
router that reconnects gets a new snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("tokenmill.server")

# Events one subscriber may have queued before it is dropped (it then reconnects and resyncs).
MAX_QUEUED = 4096


class KVEventHub:
    """One model's cached block keys (mirrored on the event loop) and its subscribers."""

    def __init__(self, model: str, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.keys: set[bytes] = set()
        self.seq = 0  # numbers every published event: a gap means a lost one
        self.ready = False  # a snapshot from the engine has arrived
        self.subscribers: set[asyncio.Queue] = set()

    # -- from the engine thread, through the loop -------------------------------------------------
    def reset(self, keys: list[bytes]) -> None:
        """The engine's cached keys now (recording started, or a new engine for this model)."""
        self.keys = set(keys)
        self.ready = True
        self._broadcast(self.snapshot)

    def apply(self, events: list[tuple[str, bytes | None]]) -> None:
        ops: list[list[Any]] = []
        for kind, key in events:
            if kind == "stored":
                self.keys.add(key)  # type: ignore[arg-type]
            elif kind == "removed":
                self.keys.discard(key)  # type: ignore[arg-type]
            else:
                self.keys.clear()
            if kind == "cleared":
                ops.append(["cleared"])
            elif ops and ops[-1][0] == kind:
                ops[-1][1].append(key.hex())  # type: ignore[union-attr]
            else:
                ops.append([kind, [key.hex()]])  # type: ignore[union-attr]
        self._broadcast(lambda: {"type": "events", "model": self.model, "seq": self.seq, "ops": ops})

    def dropped(self) -> None:
        """The model's engine is gone (on disk): nothing is cached until it is back."""
        self.reset([])
        self.ready = False

    # -- subscribers (event loop) -----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"type": "snapshot", "model": self.model, "block_size": self.block_size, "seq": self.seq,
                "hashes": [k.hex() for k in self.keys]}

    def subscribe(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)
        if self.ready:
            sub.put(self.snapshot())

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def _broadcast(self, make: Callable[[], dict[str, Any]]) -> None:
        self.seq += 1
        if not self.subscribers:
            return
        event = make()
        for sub in list(self.subscribers):
            if not sub.put(event):
                self.subscribers.discard(sub)
                logger.warning("kv events: a subscriber of %s fell behind; dropped (it resyncs)", self.model)


class Subscriber:
    """One event stream's queue (over every model); `lost` once it fell behind."""

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_queued)
        self.lost = False

    def put(self, event: dict[str, Any]) -> bool:
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self.lost = True
            return False
