"""The replicas a router sends work to: their health, their KV event streams, and (for
`--replicas N`) the local `tokenmill serve` processes the router starts and restarts.

A replica is up while its /health answers 200. One that fails a check or a request leaves the
rotation at once and is checked again with exponential backoff; when it answers again it is back.
Its KV event stream (GET /v1/kv_events) runs beside the health checks: a snapshot per model, then
the changes, numbered; a gap, a heartbeat missed or a broken connection marks its index out of
sync (kv_aware routes it by load only) until the stream is reopened and a fresh snapshot arrives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from tokenmill.router.index import ReplicaIndex

logger = logging.getLogger("tokenmill.router")

BACKOFF_START_S = 0.25
# Health checks that may time out in a row (a few seconds: each waits for its timeout) before the
# requests open on a replica are moved elsewhere; fewer would move them off a replica only busy.
ABORT_AFTER_TIMEOUTS = 3


class Replica:
    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers = headers or {}
        self.role = "decode"  # or "prefill": a prefill worker, asked only for remote prefills (router/disagg.py)
        self.up = False
        self.failures = 0  # consecutive failed checks (backoff)
        self.timeouts = 0  # consecutive checks that got no answer at all (a hung replica)
        self.index = ReplicaIndex()
        self.models: list[str] = []  # from its event stream's hello (the first is its default)
        self.load: dict[str, tuple[int, int, float]] = {}  # model -> reported (running, waiting, kv usage)
        self.stream_connected = False
        # The router's own ledger of what it sent here.
        self.inflight = 0
        self.prefilling: dict[int, int] = {}  # request -> uncached prompt tokens, until its first token
        self.decoding = 0  # requests past their first token
        self.recovered = asyncio.Event()  # set when it comes back up
        self.relays: set[Any] = set()  # streams open on it (router._Relay)
        self.on_change: Callable[[Replica], None] | None = None
        self._tasks: list[asyncio.Task] = []

    def __repr__(self) -> str:
        return f"Replica({self.url}, {'up' if self.up else 'down'})"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, client: httpx.AsyncClient, health_interval: float, health_timeout: float,
              backoff_max: float) -> None:
        self._tasks = [asyncio.create_task(self._health(client, health_interval, health_timeout, backoff_max)),
                       asyncio.create_task(self._events(client, backoff_max))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []

    def mark_down(self, why: str) -> None:
        was = self.up
        if was:
            logger.warning("replica %s is down: %s", self.url, why)
        self.up = False
        self.recovered.clear()
        # (Its KV index stays: a replica that really went away breaks its event stream, which
        # clears it; one that missed a health check keeps a stream that is still exact.)
        if was and self.on_change is not None:
            self.on_change(self)

    def _mark_up(self) -> None:
        was = self.up
        if not was:
            logger.info("replica %s is up", self.url)
        self.up = True
        self.failures = 0
        self.recovered.set()
        if not was and self.on_change is not None:
            self.on_change(self)

    def abort_relays(self, why: str) -> None:
        """Streams open on this replica give up on it (it stopped answering) and move elsewhere."""
        for relay in list(self.relays):
            relay.abort(why)

    def backoff(self, backoff_max: float) -> float:
        return min(backoff_max, BACKOFF_START_S * 2 ** max(0, self.failures - 1))

    # -- health ---------------------------------------------------------------------------------
    async def _health(self, client: httpx.AsyncClient, interval: float, timeout: float, backoff_max: float) -> None:
        while True:
            timed_out = False
            try:
                r = await client.get(self.url + "/health", timeout=timeout)
                ok = r.status_code == 200
                why = f"/health answered {r.status_code}"
            except httpx.HTTPError as e:
                ok, why = False, f"{type(e).__name__}: {e}"
                timed_out = isinstance(e, httpx.TimeoutException)
            if ok:
                self.timeouts = 0
                self._mark_up()
                await asyncio.sleep(interval)
            else:
                self.failures += 1
                self.timeouts = self.timeouts + 1 if timed_out else 0
                self.mark_down(why)
                # Only a replica that stopped answering at all is hung: its open requests move on. One
                # that refuses or answers 503 is gone (its streams break by themselves) or draining
                # (it finishes what it has).
                if self.timeouts >= ABORT_AFTER_TIMEOUTS:
                    self.abort_relays(f"{self.timeouts} health checks timed out")
                await asyncio.sleep(self.backoff(backoff_max))

    # -- KV events ------------------------------------------------------------------------------
    async def _events(self, client: httpx.AsyncClient, backoff_max: float) -> None:
        fails = 0
        while True:
            if not self.up:
                await self.recovered.wait()
            try:
                await self._follow(client)
                why = "the stream ended"
            except (httpx.HTTPError, ValueError, KeyError) as e:
                why = f"{type(e).__name__}: {e}"
            fails = 1 if self.stream_connected else fails + 1  # a stream that got going resets the backoff
            self.stream_connected = False
            self.index.lost()
            self.load.clear()  # (a replica that restarts must not be judged by its old load)
            logger.info("replica %s: KV event stream lost (%s); load-only routing until it resyncs", self.url, why)
            await asyncio.sleep(min(backoff_max, BACKOFF_START_S * 2 ** min(fails - 1, 10)))

    async def _follow(self, client: httpx.AsyncClient) -> None:
        # Heartbeats come every second: a stream silent for 5 s is dead.
        timeout = httpx.Timeout(5.0, connect=2.0)
        async with client.stream("GET", self.url + "/v1/kv_events", headers=self.headers, timeout=timeout) as r:
            if r.status_code != 200:
                raise ValueError(f"/v1/kv_events answered {r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                kind = ev["type"]
                if kind == "hello":
                    self.models = list(ev["models"])
                    self.index.hello(ev["models"])
                    self.load.clear()
                    self.stream_connected = True
                elif kind == "snapshot":
                    self.index.snapshot(ev["model"], ev["block_size"], ev["seq"], ev["hashes"])
                elif kind == "events":
                    if not self.index.apply(ev["model"], ev["seq"], ev["ops"]):
                        raise ValueError(f"event {ev['seq']} of {ev['model']} out of order")
                elif kind == "load":
                    self.load[ev["model"]] = (int(ev["running"]), int(ev["waiting"]), float(ev["kv_usage"]))

    # -- the ledger -----------------------------------------------------------------------------
    def reported(self, model: str) -> tuple[int, int, float]:
        if model in self.load:
            return self.load[model]
        if not self.load:
            return (0, 0, 0.0)
        loads = list(self.load.values())  # the model is not named: all of them
        return (sum(x[0] for x in loads), sum(x[1] for x in loads), max(x[2] for x in loads))


class LocalReplicas:
    """`tokenmill router --replicas N`: N `tokenmill serve` processes on 127.0.0.1, restarted
    (with backoff) when one dies, stopped (SIGTERM: they drain) with the router."""

    def __init__(self, n: int, serve_args: list[str], threads: int | None = None, log_dir: str | None = None,
                 host: str = "127.0.0.1", name: str = "replica") -> None:
        from tokenmill.server.serve import free_port

        self.name = name  # "replica", or "prefill" (prefill workers: their logs are prefill0.log, ...)
        self.serve_args = serve_args
        self.host = host
        self.threads = threads
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.restarts = [0] * n
        self._log_start = [0] * n
        self._stopping = False
        self._task: asyncio.Task | None = None

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self.ports]

    def _spawn(self, i: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--host", self.host, "--port", str(self.ports[i]),
               *self.serve_args]
        env = dict(os.environ)
        if self.threads:  # replicas sharing a machine share its cores
            env["OMP_NUM_THREADS"] = str(self.threads)
        logger.info("starting replica %d: %s", i, " ".join(cmd))
        die = _die_with_parent()
        if not self.log_dir:
            return subprocess.Popen(cmd, env=env, preexec_fn=die)
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, f"{self.name}{i}.log"), "a") as out:  # the child keeps its own copy
            self._log_start[i] = out.tell()  # (a log dir given again holds earlier runs too)
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die)

    def start(self) -> None:
        for i in range(len(self.ports)):
            self.procs[i] = self._spawn(i)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until every replica answers /health (RuntimeError when one exits first)."""
        from tokenmill.server.serve import wait_healthy

        deadline = time.time() + timeout
        for i, (p, url) in enumerate(zip(self.procs, self.urls)):
            assert p is not None
            log = f"; its log: {self.log_dir}/{self.name}{i}.log" if self.log_dir else ""
            try:
                wait_healthy(p, url, max(0.0, deadline - time.time()), lambda i=i, log=log: f" ({self.name} {i}{log})")
            except RuntimeError:
                why = self._log_error(i)
                if p.poll() is not None and why:  # it refused its settings: say why, as `serve` would
                    raise ValueError(f"{self.name} {i} did not start: {why}{log}") from None
                raise

    def _log_error(self, i: int) -> str | None:
        """The one-line `error: ...` a replica that refused its settings wrote last, if any."""
        if not self.log_dir:
            return None
        try:
            with open(os.path.join(self.log_dir, f"{self.name}{i}.log"), "rb") as f:
                f.seek(max(self._log_start[i], os.fstat(f.fileno()).st_size - 65536))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        return next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")), None)

    def supervise(self, backoff_max: float = 10.0) -> None:
        """Restarts replicas that die (on the event loop)."""
        self._task = asyncio.create_task(self._watch(backoff_max))

    async def _watch(self, backoff_max: float) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for i, p in enumerate(self.procs):
                if self._stopping or p is None or p.poll() is None:
                    continue
                self.restarts[i] += 1
                delay = min(backoff_max, BACKOFF_START_S * 2 ** min(self.restarts[i] - 1, 10))
                logger.warning("%s %d exited with %s; restarting in %.2f s", self.name, i, p.returncode, delay)
                self.procs[i] = None
                asyncio.get_running_loop().call_later(delay, self._restart, i)

    def _restart(self, i: int) -> None:
        if not self._stopping and self.procs[i] is None:
            self.procs[i] = self._spawn(i)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _die_with_parent() -> Callable[[], None] | None:
    """For a local replica, run between fork and exec: SIGTERM (it drains) when the router is gone,
    however it went (a SIGKILL runs no teardown, and the replicas lived on holding their ports).
    prctl is looked up here, in the parent: a forked child of a threaded process must not dlopen.
    Linux only (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the router died before that: nothing would signal
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def merge_models(cards: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """/v1/models of several replicas as one list (each model once, first replica's card)."""
    seen: dict[str, dict[str, Any]] = {}
    for data in cards:
        for card in data:
            seen.setdefault(card.get("id"), card)
    return list(seen.values())
