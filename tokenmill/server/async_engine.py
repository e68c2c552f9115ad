"""AsyncEngine: an LLMEngine's step loop on a background thread, with asyncio streams.

The engine is plain synchronous Python and not thread-safe, so exactly one thread, the
engine thread (a DeviceLoop), touches it. Handlers on the event loop submit commands (add,
abort) through a thread-safe queue; the engine thread drains the queue between steps, runs a
step, and hands the step's outputs to the loop in a single call_soon_threadsafe. Model
work therefore never blocks the event loop (torch releases the GIL in its kernels), and
an abort takes effect before the next step, so a dropped client's KV blocks are free
within one step.

A DeviceLoop runs every engine that shares a device (a model pool's): one step of each engine
with work in turn, and between steps whatever the pool asks of it (parking one model,
bringing back another), so a swap never races a step. A lone AsyncEngine gets a loop of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from tokenmill.engine.llm_engine import LLMEngine, cache_salt, request_tags
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More requests are waiting than --max-queue allows."""


class EngineStoppedError(Exception):
    """The engine is shutting down or has stopped."""


@dataclass(frozen=True)
class EngineStats:
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage_perc: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # tokens found there
    kv_cache_cached_blocks: int = 0  # unreferenced blocks still holding a reusable prefix
    spec_decode_num_drafts: int = 0  # verification steps that carried draft tokens
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    energy_joules: float = 0.0  # measured over the engine's steps (tokenmill/ops/energy.py)
    idle_energy_joules: float = 0.0  # its meter's energy outside every step
    energy_source: str = ""
    # KV kept for transfers (prefill/decode disaggregation): holds in place, the blocks they pin, and
    # holds let go before anyone took them: given way to requests, capped at half the cache, expired
    kv_holds: int = 0
    kv_held_blocks: int = 0
    kv_holds_reclaimed: int = 0
    kv_holds_capped: int = 0
    kv_holds_expired: int = 0

    # The engine's own counters (Prometheus counters), which a new engine starts from zero (the idle
    # energy is its meter's, shared by the process's engines: not one of them)
    COUNTERS: ClassVar[tuple[str, ...]] = (
        "num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "spec_decode_num_drafts",
        "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens", "energy_joules", "kv_holds_reclaimed",
        "kv_holds_capped", "kv_holds_expired")


class RequestGroup:
    """Outputs of one or more requests (a completion with several prompts), on the event loop.

    Each output is a full snapshot of its request, so only the newest unread one per request
    is kept: a slow reader skips ahead, and memory stays O(length) per request however far
    behind it falls (a queue of snapshots would grow O(length^2)).
    """

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = list(request_ids)
        self.pending = set(request_ids)
        self.rejected: Exception | None = None  # set by the engine thread when an add is refused
        self.admission: Any = None  # the tenant admission whose work it is (server/context.py)
        self._latest: dict[str, RequestOutput] = {}
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        prev = self._latest.get(out.request_id)
        if prev is not None and prev.finished:  # an unread final answer is never replaced
            return
        self._latest[out.request_id] = out
        self._ready.set()

    @property
    def num_unread(self) -> int:
        return len(self._latest)

    async def get(self) -> list[RequestOutput]:
        await self._ready.wait()
        self._ready.clear()
        latest, self._latest = self._latest, {}
        for out in latest.values():
            if out.finished:
                self.pending.discard(out.request_id)
        return list(latest.values())


class DeviceLoop:
    """The thread that runs the engines sharing a device, one step of each in turn.

    It is also the thread that builds them (ModelPool.load_initial runs there): every torch kernel
    of a server runs on this one thread. OpenMP (libgomp, as in torch's CPU wheels) keeps a pool of
    worker threads per thread that ever ran a parallel region, for as long as that thread lives;
    with more such workers alive than CPUs it stops spin-waiting between parallel regions and puts
    its workers to sleep after every one. A model loaded on the main thread and stepped on this one
    ran its forward about 1.5x slower on 2 CPUs for the server's whole life (measured; see
    docs/architecture.md)."""

    def __init__(self) -> None:
        self.fronts: list[AsyncEngine] = []
        self.wake = threading.Event()
        # Run on the device thread before each round of steps (a model pool's scheduling); returns
        # how soon it wants to run again when nothing else happens (None: no sooner than a second).
        self.between_steps: Callable[[], float | None] | None = None
        self.on_close: Callable[[], None] | None = None  # called on the thread as it ends (the pool's waiters)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._thread: threading.Thread | None = None
        self.stopping = False
        self.closed = False  # the thread has exited
        self.dead: BaseException | None = None

    def attach(self, front: AsyncEngine) -> None:
        """Adds an engine (from the device thread, or before start)."""
        front.device = self
        self.fronts.append(front)

    def detach(self, front: AsyncEngine) -> None:
        """Removes an idle engine (from the device thread): what it still had queued is refused."""
        self.fronts.remove(front)
        front._closed = True
        front._refuse_queued()

    def start(self) -> None:
        """Starts the thread (once; later calls do nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuses new work, lets every engine finish what it has, then ends the thread."""
        self.stopping = True
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self.thread_alive and self.dead is None

    @property
    def thread_alive(self) -> bool:
        """The thread is still running (or ending after a failure): it owns the engines."""
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs fn on the device thread between steps; its result (or exception) in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.closed:
            fut.set_exception(EngineStoppedError("the engine has stopped"))
            return fut
        self._calls.append((fn, fut))
        self.wake.set()
        return fut

    def _run_calls(self) -> None:
        while self._calls:
            fn, fut = self._calls.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # the caller gets it; the loop goes on
                fut.set_exception(e)

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                self.wake.clear()
                self._run_calls()
                again = self.between_steps() if self.between_steps is not None else None
                busy = False
                fronts = list(self.fronts)
                # Engines taking turns on the device run their steps one at a time (async scheduling
                # leaves none in flight while another steps: its energy interval would hold theirs).
                shared = sum(1 for f in fronts
                             if not f.engine.parked and (f._cmds or f.engine.has_unfinished_requests())) > 1
                for front in fronts:
                    front.engine.shares_device = shared
                    busy = front._tick() or busy
                if self.stopping and not any(f.engine.has_unfinished_requests() for f in self.fronts):
                    break
                if not busy and not self._calls:
                    self.wake.wait(timeout=1.0 if again is None else min(1.0, max(again, 0.001)))
        except BaseException as e:  # last resort: never leave a client hanging
            logger.exception("engine thread died")  # /health turns 503; clients get errors below
            error = self.dead = e
        finally:
            # Whatever is still queued will never run: refuse it so no caller waits forever.
            self.closed = True
            for front in self.fronts:
                front._closed = True
                front._refuse_queued()
                if error is not None:
                    front._call_soon(front._fail_all_streams, error)
            while self._calls:
                _fn, fut = self._calls.popleft()
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(EngineStoppedError("the engine has stopped"))
            if self.on_close is not None:
                try:
                    self.on_close()
                except Exception:
                    logger.exception("the device loop's on_close failed")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.on_output = on_output  # called on the loop for every output, read or not (metrics, logs)
        self.stats = EngineStats()
        self.device: DeviceLoop | None = None  # the thread that runs it (attach); its own when started alone
        self._cmds: deque[tuple[Any, ...]] = deque()
        self._streams: dict[str, RequestGroup] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False  # no engine thread will run this engine again
        self.kv_hub: Any = None  # a kv_events.KVEventHub once a fleet router subscribed (set on the loop)

    # -- lifecycle (event loop side) ---------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts serving: on a DeviceLoop of its own unless one was attached (a model pool's,
        which the pool starts)."""
        self._loop = loop
        if self.device is None:
            DeviceLoop().attach(self)
            self.device.start()  # type: ignore[union-attr]

    def stop(self, timeout: float = 10.0) -> None:
        if self.device is not None:
            self.device.stop(timeout)

    @property
    def _stopping(self) -> bool:
        return self.device is None or self.device.stopping

    @property
    def is_running(self) -> bool:
        return self.device is not None and self.device.is_running and not self._closed

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def _wake(self) -> None:
        if self.device is not None:
            self.device.wake.set()

    # -- requests (event loop side) ----------------------------------------------------------
    async def add_requests(self, requests: list[tuple[str, dict[str, Any], SamplingParams]], priority: int = 0,
                           arrival_time: float | None = None, group: RequestGroup | None = None) -> RequestGroup:
        """Queues (request_id, prompt, params) requests; returns once the engine accepted all.

        Raises ValueError (bad input), QueueFullError or EngineStoppedError before anything is
        streamed, so the caller can answer with a status code. Either all are queued or none.
        With group, they join a group already streaming (paths a test-time-compute request
        launches later), and releasing it aborts them too.
        """
        if self._stopping or not self.is_running:
            raise EngineStoppedError("the engine is not running")
        for rid, prompt, params in requests:
            if rid in self._streams:
                raise ValueError(f"request_id: {rid!r} is already in use")
            # check_request reads only immutable config, so it is safe on this thread and catches
            # bad input without a round trip to the engine thread.
            self.engine.check_request(prompt["prompt_token_ids"], params)
            cache_salt(prompt)
            request_tags(prompt)
        assert self._loop is not None
        if group is None:
            group = RequestGroup([r[0] for r in requests])
            joined: list[str] = []
        else:
            joined = [r[0] for r in requests]
            group.request_ids += joined
            group.pending.update(joined)
        arrival = arrival_time or time.time()
        futures = []
        for i, (rid, prompt, params) in enumerate(requests):
            self._streams[rid] = group
            fut: asyncio.Future[None] = self._loop.create_future()
            futures.append(fut)
            # The queue limit admits or rejects the group as a whole, at its first request (work
            # joining an admitted group is not checked again).
            self._cmds.append(("add", rid, prompt, params, priority, arrival, fut, group, i == 0 and not joined))
        self._wake()
        if self._closed:  # the engine thread exited after our check above: refuse what we queued
            self._refuse_queued()
        try:
            await asyncio.gather(*futures)
        except BaseException:  # rejected or cancelled: take back whatever was queued
            if joined:
                for rid in joined:
                    self.abort(rid)
                    self._streams.pop(rid, None)
                    group.pending.discard(rid)
            else:
                self.release(group)
            raise
        return group

    async def stream(self, group: RequestGroup) -> AsyncIterator[list[RequestOutput]]:
        """Yields batches of new outputs until every request finished. Stopping early (the
        client went away, the task was cancelled) aborts the unfinished ones."""
        try:
            while group.pending:
                yield await group.get()
        finally:
            self.release(group)

    async def generate(self, request_id: str, prompt: dict[str, Any], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """One request's outputs, as snapshots."""
        group = await self.add_requests([(request_id, prompt, params)], priority)
        async for batch in self.stream(group):
            for out in batch:
                yield out

    def release(self, group: RequestGroup) -> None:
        for rid in group.request_ids:
            if rid in group.pending:
                self.abort(rid)  # queued after the add, so nothing leaks
            self._streams.pop(rid, None)
        group.pending.clear()

    def abort(self, request_id: str) -> None:
        self._cmds.append(("abort", request_id))
        self._wake()

    def abort_seq(self, request_id: str, index: int) -> None:
        """Stops one sample of a request (a pruned reasoning path); the others go on."""
        self._cmds.append(("abort_seq", request_id, index))
        self._wake()

    # -- the engine thread -------------------------------------------------------------------
    def _tick(self) -> bool:
        """One turn on the device thread: queued commands, then a step unless the engine is parked.
        True when there is more to do right away."""
        engine = self.engine
        if engine.kv_holds:
            engine.expire_kv_holds()
        outputs = self._drain_commands()
        outputs += engine.take_outputs()  # (a step in flight that parking the model finished)
        stepped = False
        if not engine.parked and engine.has_unfinished_requests():
            stepped = True
            try:
                outputs.extend(engine.step())
            except Exception as e:  # the engine isolates per-request faults; this is a bug
                logger.exception("engine step failed; failing every request in flight")
                for rid in list(engine.requests):
                    out = engine.fail_request(rid, e)
                    if out is not None:
                        outputs.append(out)
        self._publish(outputs)
        return stepped or bool(self._cmds)

    def _refuse_queued(self) -> None:
        """Callable from either thread (deque.popleft is atomic)."""
        while True:
            try:
                cmd = self._cmds.popleft()
            except IndexError:
                return
            if cmd[0] == "add":
                self._call_soon(settle, cmd[6], EngineStoppedError("the engine has stopped"))

    def _drain_commands(self) -> list[RequestOutput]:
        engine = self.engine
        outputs: list[RequestOutput] = []
        sch, bm = engine.scheduler, engine.block_manager
        # Sequences the next step will seat are not the queue: an idle server takes a burst of what
        # its free max_num_seqs places and free KV blocks hold, plus max_queue. None are free while
        # the last step left sequences waiting.
        seats = 0 if sch.waiting or sch.num_fork_waiting else max(0, sch.max_num_seqs - len(sch.running))
        blocks = bm.num_free_blocks
        seated = 0
        while self._cmds:
            cmd = self._cmds.popleft()
            if cmd[0] == "add":
                _, rid, prompt, params, priority, arrival, fut, group, check_queue = cmd
                try:
                    if group.rejected is not None:  # an earlier request of the group was refused
                        raise group.rejected
                    before = len(sch.waiting) + sch.num_fork_waiting
                    if check_queue and self.max_queue is not None and before - seated >= self.max_queue:
                        raise QueueFullError(f"{before - seated} sequences are waiting beyond the free places "
                                             f"(--max-queue {self.max_queue})")
                    if self._stopping:
                        raise EngineStoppedError("the server is shutting down")
                    engine.add_request(prompt, params, request_id=rid, priority=priority, arrival_time=arrival)
                    added = len(sch.waiting) + sch.num_fork_waiting - before
                    need = bm.blocks_needed(len(engine.requests[rid].prompt_token_ids) + 1)
                    if 0 < added <= seats and need <= blocks:  # (its forks share the prompt's blocks)
                        seats, blocks, seated = seats - added, blocks - need, seated + added
                except Exception as e:
                    group.rejected = e
                    self._call_soon(settle, fut, e)
                else:
                    self._call_soon(settle, fut, None)
            elif cmd[0] in ("abort", "abort_seq"):
                out = engine.abort_request(cmd[1]) if cmd[0] == "abort" else engine.abort_seq(cmd[1], cmd[2])
                if out is not None:
                    outputs.append(out)
        return outputs

    def _publish(self, outputs: list[RequestOutput]) -> None:
        s = self.engine.stats()
        self.stats = EngineStats(int(s["num_requests_running"]), int(s["num_requests_waiting"]),
                                 float(s["kv_cache_usage_perc"]), int(s["num_preemptions"]),
                                 int(s["prefix_cache_queries"]), int(s["prefix_cache_hits"]),
                                 int(s["kv_cache_cached_blocks"]), int(s["spec_decode_num_drafts"]),
                                 int(s["spec_decode_num_draft_tokens"]), int(s["spec_decode_num_accepted_tokens"]),
                                 energy_joules=float(s["energy_joules"]),
                                 idle_energy_joules=float(s["idle_energy_joules"]),
                                 energy_source=self.engine.energy.source,
                                 **{k: int(s[k]) for k in ("kv_holds", "kv_held_blocks", "kv_holds_reclaimed",
                                                           "kv_holds_capped", "kv_holds_expired")})
        if outputs:
            self._call_soon(self._dispatch, outputs)
        hub = self.kv_hub
        if hub is not None:  # KV events: the cache's keys when recording starts, then each step's changes
            bm = self.engine.block_manager
            if bm.events is None:
                self._call_soon(hub.reset, bm.record_events())
            elif bm.events:
                self._call_soon(hub.apply, bm.take_events())

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is None:  # not serving yet (a pool still loading): nobody to tell
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    # -- back on the event loop --------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if self.on_output is not None:
                try:
                    self.on_output(out)
                except Exception:
                    logger.exception("output observer failed")
            group = self._streams.get(out.request_id)
            if group is not None:
                group.put(out)

    def _fail_all_streams(self, error: BaseException) -> None:
        reqs = self.engine.requests  # (the engine thread has stopped)
        self._dispatch([RequestOutput(rid, None, [], None, [], finished=True, error=f"engine stopped: {error}",
                                      uncounted=getattr(reqs.get(rid), "uncounted", False))
                        for rid in list(self._streams)])


def settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    """Completes fut (on its loop) with None or error, unless it already is."""
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
