"""The model pool: several models in one server, on one device, within one memory budget.

Each model is `active` (weights and KV cache on the device, serving), `parked` (weights in host
memory, no KV cache: on a GPU in pinned memory, so coming back is one copy per tensor; on the
CPU the weights simply stay where they are and only the KV cache goes), `loading` or `on_disk`.
Every engine of the pool runs on one DeviceLoop thread, one step of each active engine in turn,
and every change of state happens on that thread between steps, so a swap never races a step.

The budget (`memory_budget`) holds the active models' weights and KV caches. A request for a
model that is not active waits (no error) while the pool brings it back: when it does not fit,
the least recently used unpinned active model is parked, idle ones first; a busy one only
after the waiting model has waited, and the busy one has run, `swap_quantum_s` (so two busy
models take turns instead of thrashing). Parking preempts a model's running sequences by
recompute: they keep their tokens and resume unchanged when it comes back, which it does as
soon as it can since it has work. Parked weights beyond `host_memory_budget` go back to disk,
least recently used first, but only for an idle model nobody holds.

HTTP handlers hold a lease on the model they use from `acquire` until they return (a model with
leases, queued commands or requests in flight is never dropped to disk), so the context a
handler got stays valid for as long as it needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.server.async_engine import AsyncEngine, DeviceLoop, EngineStats, settle

logger = logging.getLogger("tokenmill.server")

ACTIVE, PARKED, LOADING, ON_DISK = "active", "parked", "loading", "on_disk"
STATES = (ACTIVE, PARKED, LOADING, ON_DISK)


class PoolError(Exception):
    """A model cannot be brought back (it does not fit, it failed to load, it took too long).
    retryable False: it never will as the pool is configured, so a client should not try again."""

    def __init__(self, message: str, status: int = 503, code: str = "model_unavailable",
                 retryable: bool = True) -> None:
        super().__init__(message)
        self.status, self.code, self.retryable = status, code, retryable


@dataclass
class ModelSpec:
    """One model of the pool (a --model flag or a models.yaml entry)."""

    name: str
    config: EngineConfig
    pinned: bool = False  # never parked to make room
    tool_call_parser: str = "auto"
    reasoning_parser: str | None = None


@dataclass
class PoolConfig:
    memory_budget: int | None = None  # bytes for the active models' weights and KV caches; None: no limit
    host_memory_budget: int | None = None  # bytes of parked weights kept in host memory; None: no limit
    swap_quantum_s: float = 2.0  # how long a waiting model waits, and a busy one runs, before a busy one is parked
    load_timeout_s: float = 120.0  # a request waits this long for its model, then gets a 503
    max_queue: int | None = None


class PoolEntry:
    """One model's state. Written on the device thread (and before the pool starts); the event
    loop reads it and counts its own leases, demand and waiters."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.state = ON_DISK
        self.engine: LLMEngine | None = None
        self.front: AsyncEngine | None = None
        self.ctx: Any = None  # the HTTP side's per-model context (ServerContext)
        self.weight_bytes = 0  # measured at the first load
        self.kv_bytes = 0
        self.est_bytes = _estimate_bytes(spec.config)  # until it has loaded once
        self.max_model_len = configured_max_model_len(spec.config)  # (the engine's, once it has loaded)
        self.last_used: float | None = None  # wall-clock time of the last request (or step with work)
        self.active_since = 0.0  # monotonic
        self.want_since: float | None = None  # monotonic: since when it waits to become active
        self.leases = 0  # handlers between acquire and release (event loop)
        self.demand = 0  # handlers waiting for it to become active (event loop)
        self.waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self.load_requested = False  # an admin load or pin asked for it
        self.error: str | None = None  # the last load failure
        self.swaps = 0  # times it became active after the start
        self.kv_hub: Any = None  # its KV events (kv_events.KVEventHub) once a router subscribed
        # Its counters (EngineStats.COUNTERS) from engines let go: a model dropped to disk and loaded
        # again starts a new engine from zero, and Prometheus counters must not go back.
        self.carried: dict[str, float] = {}
        self.carried_source = ""
        self.carried_idle = 0.0  # (its meter's idle energy, the process's: the largest seen)

    @property
    def footprint(self) -> int:
        """Device bytes while active: weights and KV cache (an estimate until it has loaded)."""
        return self.weight_bytes + self.kv_bytes if self.weight_bytes else self.est_bytes

    def busy(self) -> bool:
        """Work in flight or on the way: then it is parked only once it has had its turn."""
        front = self.front
        return bool(self.demand or (front is not None and (front._cmds or front.num_in_flight))
                    or (self.engine is not None and self.engine.has_unfinished_requests()))

    def held(self) -> bool:
        """Busy, or a handler holds its context: then it is never dropped to disk (parking a held
        model is harmless: what the handler submits waits for it to come back)."""
        return self.leases > 0 or self.busy()

    def wants_device(self) -> bool:
        # Waiters, not demand: a failed load or unpark answers its waiters at once, but their
        # handlers give back demand only later, on the event loop; counting it started the load
        # again for no one (parking the others for it).
        return self.state in (PARKED, ON_DISK) and (
            bool(self.waiters) or self.load_requested
            or (self.engine is not None and self.engine.has_unfinished_requests())
            or (self.front is not None and bool(self.front._cmds)))


def configured_max_model_len(config: EngineConfig) -> int | None:
    """The context an engine of this config will have, read without loading it: max_model_len,
    else the model's (None for a folder it cannot read: its load says what is wrong)."""
    from tokenmill.config import ModelConfig

    if config.max_model_len is not None:
        return config.max_model_len
    try:
        return ModelConfig.from_pretrained(config.model).max_context
    except (OSError, ValueError):
        return None


def _weight_bytes(config: EngineConfig) -> int:
    """The checkpoint's tensors at the dtype they will run in (read from the safetensors headers;
    the prepacked copy on CPU counted when prepacking is not off), and a draft model's, which runs
    in the same dtype beside it."""
    import torch

    from tokenmill.config import ModelConfig, SpeculativeConfig

    device = config.resolve_device()
    try:
        mc = ModelConfig.from_pretrained(config.model)
        target = config.resolve_dtype(mc, device)
    except Exception:  # an unreadable config fails the load itself, with its own message
        mc, target = None, torch.float32
    elem = torch.finfo(target).bits // 8 if target.is_floating_point else 1
    int8 = config.quantization == "int8"
    total = _checkpoint_bytes(config.model, elem, int8, mc if config.load_format == "dummy" else None)
    try:
        spec = SpeculativeConfig.parse(config.speculative_config)
    except ValueError:
        spec = None
    if spec is not None and spec.model:
        try:
            draft = ModelConfig.from_pretrained(spec.model) if config.load_format == "dummy" else None
        except ValueError:
            draft = None
        total += _checkpoint_bytes(spec.model, elem, int8, draft)  # (quantized as the target is)
    if device.type == "cpu" and config.prepack_weights is not False and config.quantization is None:
        total *= 2  # the oneDNN copy (None: made when RAM allows, so counted)
    return total


def _checkpoint_bytes(folder: str, elem: int, int8: bool, dummy: Any = None) -> int:
    """The bytes of a checkpoint folder's tensors once loaded (shapes from the safetensors headers):
    elem a value, or with int8 quantization one a matrix value plus a float32 scale a row (norms
    and biases stay at elem). dummy: the ModelConfig of a model loaded without its checkpoint,
    whose shape says the same."""
    import glob
    import os

    from safetensors import safe_open

    if dummy is not None:  # (int8: the matrices dominate; a scale per vocabulary row for the largest)
        return dummy.num_parameters * (1 if int8 else elem) + (4 * dummy.vocab_size if int8 else 0)
    total = 0
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n + 4 * shape[0] if int8 and len(shape) == 2 else n * elem
    return total


def _estimate_bytes(config: EngineConfig) -> int:
    """Device bytes a model will take before it has loaded: its weights, plus its KV cache when
    that is given."""
    from tokenmill.engine.model_runner import available_ram_bytes

    total = _weight_bytes(config)
    if config.memory_bytes is not None:
        return max(total, config.memory_bytes)
    kv = config.kv_cache_memory_bytes
    if kv is None:
        kv = int(available_ram_bytes() * config.cpu_kv_cache_fraction)
    return total + kv


class ModelPool:
    def __init__(self, specs: list[ModelSpec], config: PoolConfig,
                 make_ctx: Callable[[ModelSpec, AsyncEngine], Any]) -> None:
        if not specs:
            raise ValueError("the pool needs at least one model")
        self.config = config
        self.entries: dict[str, PoolEntry] = {}
        for s in specs:
            if s.name in self.entries:
                raise ValueError(f"model {s.name!r} is listed twice; give each model its own name")
            self.entries[s.name] = PoolEntry(s)
        self.default = specs[0].name  # what a request without `model` gets
        self.make_ctx = make_ctx
        self._stats_lock = threading.Lock()  # a front let go and its counters carried, as one change
        self.device = DeviceLoop()  # its scheduling (between_steps) starts with start()
        self.device.on_close = self.fail_all_waiters
        self._load_lock = threading.Lock()  # one background load at a time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self.on_swap: Callable[[str, float, str], None] | None = None  # called on the device thread

    # -- startup and shutdown (main thread) -------------------------------------------------------
    def load_initial(self) -> None:
        """Loads the models before serving, on the engine thread (see DeviceLoop: the thread that
        steps a model must be the one that built it). Raises what loading raised."""
        self.device.start()
        try:
            self.device.call(self._load_initial).result()
        except BaseException:
            self.stop()  # (the models loaded before the failure go too: the app's routes keep the pool)
            raise

    def _load_initial(self) -> None:
        """Pinned models first, then in the order given. The first ones the budget holds end up
        active, the others parked while host memory holds them, else on disk until a request
        needs them. A model is only ever built with room for it in the budget (on a GPU it is
        built on the device): earlier ones are parked for it."""
        order = sorted(self.entries.values(), key=lambda e: not e.spec.pinned)
        budget = self.config.memory_budget
        for e in order:
            if self.device.stopping:  # interrupted (Ctrl-C) while loading: build no more
                raise PoolError("startup interrupted")
            if budget is not None and e.est_bytes > budget:
                raise ValueError(f"model {e.name!r}: it needs about {e.est_bytes / 2**30:.2f} GiB (weights and KV "
                                 f"cache), more than the whole --memory-budget {budget / 2**30:.2f} GiB")
            if budget is not None and e.est_bytes > budget - self._used():
                hb = self.config.host_memory_budget
                if not e.spec.pinned and hb is not None:
                    # The weights the models parked for it would add to host memory.
                    free, parked = budget - self._used(), self._parked_bytes()
                    for v in [v for v in reversed(order) if v.state == ACTIVE and not v.spec.pinned]:
                        if e.est_bytes <= free:
                            break
                        free += v.footprint
                        parked += v.weight_bytes
                    if parked > hb:
                        logger.info("model %s: left on disk (neither budget holds it now)", e.name)
                        continue
                for v in [v for v in reversed(order) if v.state == ACTIVE and not v.spec.pinned]:
                    if e.est_bytes <= budget - self._used():
                        break
                    if not self._park(v):  # for now: who ends up active is settled below
                        raise ValueError(f"model {v.name!r} could not be parked to make room for {e.name!r}")
                if e.est_bytes > budget - self._used():
                    raise ValueError(f"the pinned models take more than --memory-budget {budget / 2**30:.2f} GiB")
            try:
                engine, front, ctx = self._build(e.spec)
            except ValueError as err:
                raise ValueError(f"model {e.name!r}: {err}") from None
            self._adopt(e, engine, front, ctx)
            if budget is not None and e.footprint > budget:
                raise ValueError(f"model {e.name!r}: it takes {e.footprint / 2**30:.2f} GiB (weights and KV cache), "
                                 f"more than the whole --memory-budget {budget / 2**30:.2f} GiB")
        if budget is not None:
            pinned = sum(e.footprint for e in order if e.spec.pinned)
            for e in order:
                if not e.spec.pinned and pinned + e.footprint > budget:
                    raise ValueError(f"model {e.name!r} ({e.footprint / 2**30:.2f} GiB) does not fit in "
                                     f"--memory-budget {budget / 2**30:.2f} GiB beside the pinned models "
                                     f"({pinned / 2**30:.2f} GiB)")
            # The first models the budget holds are the active ones.
            want, used = [], 0
            for e in order:
                if e.engine is not None and used + e.footprint <= budget:
                    want.append(e)
                    used += e.footprint
            for e in order:
                if e.state == ACTIVE and e not in want and not self._park(e):
                    raise ValueError(f"model {e.name!r} could not be parked")
            for e in want:
                if e.state == PARKED:
                    e.engine.unpark()  # type: ignore[union-attr]
                    e.state = ACTIVE
        self._enforce_host_budget()
        for e in order:
            logger.info("model %s: %s (%.1f MiB weights, %.1f MiB KV cache)", e.name, e.state,
                        e.weight_bytes / 2**20, e.kv_bytes / 2**20)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for e in self.entries.values():
            if e.front is not None:
                e.front._loop = loop
        self._started = True
        self.device.between_steps = self._schedule
        self.device.start()
        self.device.wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the engine thread; once it has ended, lets every engine go (its weights, its KV
        cache), so that a process that embeds a server (tokenmill.ray.InProcessServer) gets the
        memory back: the app's routes outlive the server (FastAPI keeps endpoint functions in a
        module-level cache), and through their closures this pool."""
        self.device.stop(timeout)
        if self.device.thread_alive:
            return  # still finishing (the join timed out): the thread owns the engines
        for e in self.entries.values():
            self._let_go(e)
        gc.collect()

    @property
    def is_running(self) -> bool:
        return self.device.is_running

    # -- the event loop's side --------------------------------------------------------------------
    def kv_hub(self, name: str) -> Any:
        """The model's KV event hub (event loop); made on first use, when recording starts."""
        from tokenmill.server.kv_events import KVEventHub

        e = self.entries[name]
        if e.kv_hub is None:
            hub = e.kv_hub = KVEventHub(name, e.spec.config.block_size)

            def attach() -> None:  # on the device thread, as _adopt, so no new engine misses the hub
                if e.front is not None:
                    e.front.kv_hub = hub

            self.device.call(attach)
        return e.kv_hub

    def entry(self, name: str) -> PoolEntry | None:
        return self.entries.get(name)

    async def acquire(self, name: str, need_device: bool = True) -> tuple[Any, dict[str, Any] | None]:
        """The model's context once it is active, and how long the caller waited for it (None
        when it was active already). Takes a lease the caller gives back with release(). PoolError
        when it cannot come back. need_device False (tokenizing): a parked model's context as it is."""
        e = self.entries[name]
        if self.device.closed:  # its thread has ended: the engines are let go (stop)
            raise PoolError("the engine has stopped" if self.device.dead is not None else "the server is shutting down")
        e.leases += 1
        try:
            ctx = e.ctx  # read once: the device thread may drop it meanwhile
            if not need_device:  # None for a model on disk: the caller does without
                if ctx is None:
                    e.leases -= 1
                return ctx, None
            e.last_used = time.time()
            if e.state == ACTIVE:
                return e.ctx, None
            swap = await self._wait_active(e)
            return e.ctx, swap  # read after the wait: a model loaded from disk has a new context
        except BaseException:
            e.leases -= 1
            raise

    def release(self, name: str) -> None:
        self.entries[name].leases -= 1

    async def _wait_active(self, e: PoolEntry) -> dict[str, Any]:
        if self.device.closed or self.device.dead is not None:
            raise PoolError("the engine is not running")
        self.check_fits(e.name)
        room = self._room_for(e)
        if e.footprint > room:  # (a 503: it fits once an admin unpins a model, no restart needed)
            raise PoolError(f"model {e.name!r} needs {e.footprint / 2**20:.0f} MiB but the pinned models leave "
                            f"{room / 2**20:.0f} MiB of --memory-budget; unpin one (POST /v1/models/ID/pin "
                            f'{{"pinned": false}})')
        t0 = time.perf_counter()
        from_state = e.state
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        e.demand += 1
        if e.want_since is None:
            e.want_since = time.monotonic()
        e.waiters.append((loop, fut))
        if e.state == ACTIVE:  # it became active between the check and the append
            fut.set_result(None)
        self.device.wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.config.load_timeout_s)
        except asyncio.TimeoutError:
            raise PoolError(f"model {e.name!r} was not brought back within {self.config.load_timeout_s:g} s "
                            f"(it is {e.state}; the models holding the memory are busy)") from None
        finally:
            e.demand -= 1
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):  # already taken by the device thread
                e.waiters.remove((loop, fut))  # (also one settled here: a stale one would bring it back)
        return {"model": e.name, "from": from_state, "wait_s": round(time.perf_counter() - t0, 6)}

    def check_fits(self, name: str) -> None:
        """A PoolError(500, not retryable) for a model larger than the whole --memory-budget: nothing
        the pool or an admin does at runtime makes room for it (startup refuses one whose estimate
        is; this one turned out larger once it had loaded), so a 503 inviting retries would mislead."""
        e = self.entries[name]
        budget = self.config.memory_budget
        if budget is not None and e.footprint > budget:
            raise PoolError(f"model {e.name!r} needs {e.footprint / 2**20:.0f} MiB (weights and KV cache), more "
                            f"than the whole --memory-budget ({budget / 2**20:.0f} MiB): it cannot be brought back "
                            f"as this server is configured (give it a smaller memory_share or kv_cache_memory, or "
                            f"the pool a larger budget)", 500, code="model_does_not_fit", retryable=False)

    async def load(self, name: str) -> dict[str, Any] | None:
        """Brings a model to active (an admin load)."""
        ctx, swap = await self.acquire(name)
        self.release(name)
        return swap

    async def run_on_device(self, fn: Callable[[], Any]) -> Any:
        """fn's result, run on the device thread between steps."""
        return await asyncio.wrap_future(self.device.call(fn))

    def unload(self, name: str, to_disk: bool) -> str:
        """Parks a model (or drops it to disk) now; on the device thread. PoolError(409) when it
        is pinned, has requests in flight or is loading."""
        e = self.entries[name]
        if e.spec.pinned:
            raise PoolError(f"model {name!r} is pinned; unpin it first (POST /v1/models/{name}/pin "
                            f'{{"pinned": false}})', 409)
        if e.busy() or (to_disk and e.leases):
            raise PoolError(f"model {name!r} has requests in flight; unload it once they finish", 409)
        if e.state == LOADING:  # (a load runs to its end: saying 200 would leave it active after all)
            raise PoolError(f"model {name!r} is loading; unload it once it has loaded", 409)
        e.load_requested = False
        if e.state == ACTIVE:
            self._park(e)
        if to_disk and e.state == PARKED:
            self._drop(e, "unloaded")
        return e.state

    def pin(self, name: str, pinned: bool) -> None:
        """Pins a model (kept active; brought back now if it is not) or unpins it; on the device
        thread. PoolError(409) when the pinned models would leave another model no room: its
        requests could never be served (and a parked one's preempted requests never resume)."""
        e = self.entries[name]
        if not pinned:
            e.spec.pinned = False
            e.load_requested = False
            return
        budget = self.config.memory_budget
        if budget is not None:
            pinned_bytes = sum(o.footprint for o in self.entries.values() if o.spec.pinned or o is e)
            for o in self.entries.values():
                if not o.spec.pinned and o is not e and pinned_bytes + o.footprint > budget:
                    raise PoolError(f"pinning {name!r} would leave model {o.name!r} no room in --memory-budget "
                                    f"({(pinned_bytes + o.footprint) / 2**20:.0f} MiB needed of "
                                    f"{budget / 2**20:.0f} MiB); unpin another model first", 409)
        e.spec.pinned = True
        if e.state != ACTIVE:
            e.load_requested = True
            if e.want_since is None:
                e.want_since = time.monotonic()

    # -- the device thread ------------------------------------------------------------------------
    def _schedule(self) -> float | None:
        """Between steps: bring back the models that have work, parking others to make room.
        Returns how soon to look again when a waiting model's turn is still to come."""
        now = time.monotonic()
        for e in self.entries.values():
            if e.state == ACTIVE and e.engine is not None and e.engine.has_unfinished_requests():
                e.last_used = time.time()
        wanted = [e for e in self.entries.values() if e.wants_device()]
        for e in self.entries.values():
            if e.want_since is not None and e not in wanted and e.state != LOADING:
                e.want_since = None  # its waiters gave up: the next one waits its turn again
        if wanted:
            for e in sorted(wanted, key=lambda e: e.want_since if e.want_since is not None else now):
                if e.want_since is None:
                    e.want_since = now
                self._bring_back(e, now)
        self._enforce_device_budget()
        self._enforce_host_budget()
        waiting = [e.want_since for e in self.entries.values() if e.wants_device() and e.want_since is not None]
        if not waiting:
            return None
        # A waiting model's turn comes once it has waited, and an active busy one has run, a quantum.
        q = self.config.swap_quantum_s
        turns = [w + q for w in waiting] + [v.active_since + q for v in self.entries.values() if v.state == ACTIVE]
        later = [t - now for t in turns if t > now]
        return min(later) if later else 0.05

    def _used(self) -> int:
        return sum(e.footprint for e in self.entries.values() if e.state in (ACTIVE, LOADING))

    def _room_for(self, e: PoolEntry) -> int:
        budget = self.config.memory_budget
        if budget is None:
            return 1 << 62
        pinned = sum(o.footprint for o in self.entries.values()
                     if o is not e and o.spec.pinned and o.state in (ACTIVE, LOADING))
        return budget - pinned

    def _parked_bytes(self) -> int:
        return sum(e.weight_bytes for e in self.entries.values() if e.state == PARKED)

    def _bring_back(self, e: PoolEntry, now: float) -> None:
        budget = self.config.memory_budget
        need = e.footprint
        t0 = time.perf_counter()  # a swap's time: parking what must go, then bringing e back
        if budget is not None:
            free = budget - self._used()
            if need > free:
                victims = self._victims(e, now)
                if free + sum(v.footprint for v in victims) < need:
                    return  # not yet: wait for a model to go idle or for its turn
                for v in victims:
                    if free >= need:
                        break
                    if not self._park(v):
                        return
                    free += v.footprint
        if e.state == PARKED:
            try:
                e.engine.unpark()  # type: ignore[union-attr]
            except Exception as err:  # out of memory, say: this model fails, the others go on
                with contextlib.suppress(Exception):  # weights restored before the KV cache failed: give them back
                    runner = e.engine.runner  # type: ignore[union-attr]
                    if runner.device.type != "cpu" and runner.kv_released and not runner.weights_offloaded:
                        runner.offload_weights()
                self._failed_to_return(e, err)
                return
            self._activated(e, time.perf_counter() - t0, PARKED)
        elif e.state == ON_DISK:
            self._start_load(e)

    def _victims(self, e: PoolEntry, now: float) -> list[PoolEntry]:
        """Active models that may be parked for e, in the order to park them: idle ones least
        recently used first, then (once e has waited its turn) busy ones that have run theirs."""
        q = self.config.swap_quantum_s
        active = [v for v in self.entries.values() if v is not e and v.state == ACTIVE and not v.spec.pinned]
        idle = sorted((v for v in active if not v.busy()), key=lambda v: v.last_used or 0.0)
        waited = e.want_since is not None and now - e.want_since >= q
        busy = sorted((v for v in active if v.busy() and waited and now - v.active_since >= q
                       and not v.engine.catching_up()),  # type: ignore[union-attr]
                      key=lambda v: v.active_since)
        return idle + busy

    def _park(self, v: PoolEntry) -> bool:
        """Parks v; False when it could not be (no pinned host memory for its weights, say): it
        stays active and whole, and its memory is not free."""
        t0 = time.perf_counter()
        try:
            preempted = v.engine.park()  # type: ignore[union-attr]
        except Exception:
            logger.exception("model %s could not be parked; it stays active", v.name)
            return False
        v.state = PARKED
        if v.engine.has_unfinished_requests():  # type: ignore[union-attr]
            v.want_since = time.monotonic()  # its requests wait for it: it is next in line
        logger.info("model %s parked in %.2f ms (%d sequences preempted, resumed when it is back)", v.name,
                    1000 * (time.perf_counter() - t0), preempted)
        return True

    def _activated(self, e: PoolEntry, seconds: float, from_state: str) -> None:
        e.state = ACTIVE
        e.active_since = time.monotonic()
        e.want_since = None
        e.load_requested = False
        e.error = None
        if self._started:
            e.swaps += 1
            if self.on_swap is not None:
                self.on_swap(e.name, seconds, from_state)
        logger.info("model %s active (from %s in %.2f ms)", e.name, from_state, 1000 * seconds)
        self._resolve_waiters(e, None)

    def _failed_to_return(self, e: PoolEntry, err: BaseException) -> None:
        """A model that could not be brought back: its waiters get a 503 and its queued
        requests fail (nothing would ever run them), so no one waits in vain."""
        logger.exception("model %s could not be brought back", e.name, exc_info=err)
        e.load_requested = False
        e.want_since = None
        e.error = f"{type(err).__name__}: {err}"
        if e.engine is not None and e.front is not None:
            outs = [o for rid in list(e.engine.requests) if (o := e.engine.fail_request(rid, err)) is not None]
            for o in outs:
                o.error, o.error_status = f"model {e.name!r} could not be brought back: {e.error}", 503
            e.front._publish(outs)
        self._resolve_waiters(e, PoolError(f"model {e.name!r} could not be brought back: {e.error}"))

    def fail_all_waiters(self) -> None:
        """The device loop has ended: whoever waits for a model is told at once."""
        for e in self.entries.values():
            self._resolve_waiters(e, PoolError("the engine is not running"))

    def _resolve_waiters(self, e: PoolEntry, error: BaseException | None) -> None:
        while e.waiters:
            loop, fut = e.waiters.popleft()
            try:
                loop.call_soon_threadsafe(settle, fut, error)
            except RuntimeError:  # the loop is closed
                pass

    def _enforce_device_budget(self) -> None:
        """A model that turned out larger than its estimate may overfill the budget: park idle ones."""
        budget = self.config.memory_budget
        if budget is None or self._used() <= budget:
            return
        for v in sorted((v for v in self.entries.values() if v.state == ACTIVE and not v.spec.pinned
                         and not v.busy()), key=lambda v: v.last_used or 0.0):
            if self._used() <= budget:
                return
            if not self._park(v):
                return

    def _enforce_host_budget(self) -> None:
        hb = self.config.host_memory_budget
        if hb is None:
            return
        for v in sorted((v for v in self.entries.values() if v.state == PARKED and not v.held()),
                        key=lambda v: v.last_used or 0.0):
            if self._parked_bytes() <= hb:
                return
            self._drop(v)

    def _let_go(self, v: PoolEntry) -> None:
        """The model's engine leaves the device loop, and the pool keeps no reference to it."""
        if v.front is not None and v.front in self.device.fronts:
            self.device.detach(v.front)
        with self._stats_lock:
            if v.front is not None:
                s = v.front.stats
                for f in EngineStats.COUNTERS:
                    v.carried[f] = v.carried.get(f, 0) + getattr(s, f)
                v.carried_source = s.energy_source or v.carried_source
                v.carried_idle = max(v.carried_idle, s.idle_energy_joules)
            v.engine = v.front = v.ctx = None

    def model_stats(self) -> list[tuple[str, EngineStats, str]]:
        """Each model's stats (its counters over every engine it has had) and state, for metrics."""
        out = []
        with self._stats_lock:
            for e in self.entries.values():
                s = e.front.stats if e.front is not None else EngineStats()
                if e.carried:
                    s = dataclasses.replace(s, energy_source=s.energy_source or e.carried_source,
                                            idle_energy_joules=max(s.idle_energy_joules, e.carried_idle),
                                            **{f: getattr(s, f) + v for f, v in e.carried.items()})
                out.append((e.name, s, e.state))
        return out

    def _drop(self, v: PoolEntry, why: str = "host memory budget") -> None:
        """Parked to on disk: the engine and its weights are let go."""
        self._let_go(v)
        v.state = ON_DISK
        if v.kv_hub is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(v.kv_hub.dropped)
        gc.collect()
        logger.info("model %s dropped to disk (%s)", v.name, why)

    # -- loading ----------------------------------------------------------------------------------
    def _build(self, spec: ModelSpec) -> tuple[LLMEngine, AsyncEngine, Any]:
        engine = LLMEngine(spec.config)
        front = AsyncEngine(engine, max_queue=self.config.max_queue)
        return engine, front, self.make_ctx(spec, front)

    def _adopt(self, e: PoolEntry, engine: LLMEngine, front: AsyncEngine, ctx: Any) -> None:
        e.engine, e.front, e.ctx = engine, front, ctx
        front.kv_hub = e.kv_hub
        e.weight_bytes = engine.runner.resident_weight_bytes
        e.kv_bytes = engine.runner.num_blocks * engine.runner.kv_bytes_per_block
        e.max_model_len = engine.max_model_len
        front._loop = self._loop
        self.device.attach(front)
        e.state = ACTIVE
        e.active_since = time.monotonic()

    def _start_load(self, e: PoolEntry) -> None:
        e.state = LOADING
        t0 = time.perf_counter()
        logger.info("model %s: loading from %s", e.name, e.spec.config.model)
        fut: Future = Future()

        def load() -> None:
            # A thread of its own, which ends with the load: its OpenMP workers go with it (see
            # DeviceLoop), so serving runs at full speed again once the model is in.
            with self._load_lock:
                try:
                    if self.device.stopping:  # shutting down: no more models
                        raise PoolError(f"model {e.name!r}: the server is shutting down")
                    fut.set_result(self._build(e.spec))
                except BaseException as err:
                    fut.set_exception(err)

        threading.Thread(target=load, name=f"tokenmill-load-{e.name}", daemon=True).start()

        def done(f: Future) -> None:
            try:
                self.device.call(lambda: self._loaded(e, f, time.perf_counter() - t0))
            except Exception:  # the device loop is gone: nothing waits any more
                pass

        fut.add_done_callback(done)

    def _loaded(self, e: PoolEntry, f: Future, seconds: float) -> None:
        try:
            engine, front, ctx = f.result()
        except BaseException as err:
            logger.exception("model %s failed to load", e.name)
            e.state = ON_DISK
            e.load_requested = False
            e.want_since = None
            e.error = f"{type(err).__name__}: {err}"
            self._resolve_waiters(e, PoolError(f"model {e.name!r} failed to load: {e.error}"))
            return
        self._adopt(e, engine, front, ctx)
        self._activated(e, seconds, ON_DISK)

