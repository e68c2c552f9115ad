"""tokenmill on Ray Serve: the same engines on many replicas, across machines, behind one endpoint.

    python -m tokenmill.ray --replicas 2 --model DIR [--num-cpus-per-replica 4] [tokenmill serve flags]

The application has one deployment per replica group (`ReplicaGroup`: its `tokenmill serve` flags,
replica count and Ray resources) and an ingress deployment:

- `TokenmillReplica`: each Serve replica runs a real tokenmill server in-process (the app `tokenmill
  serve` builds, under uvicorn in a thread) on its node's IP and a free port. Requests go to it over
  HTTP straight from the ingress, not through Serve's handles: the server streams, batches and
  counts its queue itself, so nothing is lost against a plain `tokenmill serve`.
- `TokenmillIngress`: the fleet router's FastAPI app (`tokenmill.router`) served through Serve's HTTP
  proxy. It learns the replicas' URLs with `DeploymentHandle.broadcast("info")` every second, so
  replicas that autoscaling adds or removes join and leave the router without a restart.
- Autoscaling (when max replicas > min replicas): each replica reports its engines' running and
  waiting sequences and KV cache usage through Serve's `record_autoscaling_stats` hook, and
  `QueueKVAutoscalingPolicy`, a custom deployment-scoped policy, turns them into a replica count.
  Serve's own request counts cannot drive it: the traffic never passes through Serve's handles.

Every node needs the same Python environment and the model folder at the same path.
`run_ray(args)` is `tokenmill serve --ray`; `app_builder` is for `serve run` /
Serve config files; `build_app` for Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import secrets
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.config import AutoscalingContext
    from ray.serve.handle import DeploymentHandle

logger = logging.getLogger("tokenmill.ray")

# Custom autoscaling metrics each replica reports (Serve keys them by replica).
METRIC_RUNNING = "tokenmill_running"
METRIC_WAITING = "tokenmill_waiting"
METRIC_KV_USAGE = "tokenmill_kv_usage"

# Set (unless already set) before Ray is imported or started: its processes inherit them.
LEAN_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats report (nor its network attempt) at startup
}
# Only for a cluster of this one machine: Ray otherwise turns 127.0.0.1 into the machine's outward IP
# (services.resolve_ip_for_localhost) and its GCS, raylet, agents and workers listen on every interface.
# With it off, ray.util.get_node_ip_address() is 127.0.0.1 and nothing listens beyond loopback.
# Read when ray is imported (ray._private.ray_constants.ENABLE_RAY_CLUSTER).
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def apply_lean_ray_env(loopback: bool = False) -> None:
    for k, v in {**LEAN_RAY_ENV, **(LOOPBACK_RAY_ENV if loopback else {})}.items():
        os.environ.setdefault(k, v)
    if loopback and "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            logger.warning("ray was imported before tokenmill.ray could keep it on 127.0.0.1: the local "
                           "cluster will listen on this machine's outward IP too")


def init_local_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """ray.init of a lean single-machine cluster on 127.0.0.1 only (what tests and one-machine runs use)."""
    apply_lean_ray_env(loopback=True)
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             # Handles pass only small objects; the plasma store's floor is 75 MiB (default: 30% of RAM).
             object_store_memory=100 * 2**20, **kwargs)


# -- the replica: a tokenmill server inside a Serve replica actor -----------------------------------
class InProcessServer:
    """`tokenmill serve`'s app (serve.build_server_app) under uvicorn in a thread of this process, on host
    and a free port; tokenmill.server.serve._run does the same on the main thread."""

    def __init__(self, args: argparse.Namespace, host: str, port: int = 0, start_timeout: float = 60.0) -> None:
        from tokenmill.server.serve import build_server_app, pool_from_args

        if args.max_queue is not None and args.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
        specs, tiers, pool_config = pool_from_args(args)
        app, self.pool = build_server_app(args, specs, tiers, pool_config, lambda: self.url)
        # Claimed only once the model has loaded: nothing routes here before its URL is known anyway.
        self._sock = None
        try:
            self._start(app, args, host, port, start_timeout)
        except BaseException:  # the engines (their threads, the device memory) go with the failed start
            self.pool.stop()
            if self._sock is not None:
                self._sock.close()
            raise

    def _start(self, app: Any, args: argparse.Namespace, host: str, port: int, start_timeout: float) -> None:
        import uvicorn

        from tokenmill.server.serve import bind_socket

        self._sock = bind_socket(host, port)
        bound_host, bound_port = self._sock.getsockname()[:2]
        self.url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
        self._app = app
        level = (getattr(args, "log_level", None) or "info").lower()
        config = uvicorn.Config(app, log_level=level, access_log=False, log_config=None,
                                timeout_graceful_shutdown=args.shutdown_timeout)
        self.shutdown_timeout: float = args.shutdown_timeout
        # uvicorn installs no signal handlers off the main thread: stop() is the only way out.
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="tokenmill-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                self._thread.join(5)
                raise RuntimeError(f"the tokenmill server on {self.url} did not start")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.pool.is_running

    def load(self) -> dict[str, float]:
        """Running and waiting sequences over the server's models, and the fullest KV cache (0 to 1)."""
        running = waiting = 0
        kv = 0.0
        for e in self.pool.entries.values():
            waiting += e.demand  # requests waiting for a parked model to come back
            front = e.front  # (read once: stop() may drop it meanwhile)
            if front is not None:
                s = front.stats  # the engine thread's latest snapshot, replaced whole each step
                running += s.num_requests_running
                waiting += s.num_requests_waiting
                kv = max(kv, s.kv_cache_usage_perc)
        return {"running": float(running), "waiting": float(waiting), "kv_usage": kv}

    def stop(self) -> None:
        """Stops admitting, lets in-flight requests finish (up to --shutdown-timeout), stops the engines."""
        self._app.state.draining = True  # as serve's SIGTERM: requests on open connections get 503
        self._server.should_exit = True
        self._thread.join(self.shutdown_timeout + 10)
        self._sock.close()


class TokenmillReplica:
    """A Serve deployment class: one tokenmill server per Serve replica (its resources are the
    deployment's ray_actor_options). args: `tokenmill serve`'s flags; --host/--port are ignored, the
    server listens on this node's IP and a free port."""

    def __init__(self, args: argparse.Namespace) -> None:
        import ray

        logging.getLogger("tokenmill").setLevel((getattr(args, "log_level", None) or "info").upper())
        self._server = InProcessServer(args, host=ray.util.get_node_ip_address())
        logger.info("tokenmill replica serving on %s", self._server.url)

    def info(self) -> dict[str, Any]:
        """What the ingress polls (by broadcast): where this replica is and how loaded."""
        return {"url": self._server.url, **self._server.load()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook: called on each replica every few seconds when the deployment
        autoscales; QueueKVAutoscalingPolicy reads the values per replica (ctx.aggregated_metrics)."""
        load = self._server.load()
        return {METRIC_RUNNING: load["running"], METRIC_WAITING: load["waiting"], METRIC_KV_USAGE: load["kv_usage"]}

    def check_health(self) -> None:
        """Serve calls it periodically; raising makes Serve replace this replica."""
        if not self._server.alive:
            raise RuntimeError(f"the tokenmill server on {self._server.url} has stopped")

    def __del__(self) -> None:
        # Serve calls it on graceful shutdown (scale-down, redeploy, serve.delete).
        server = getattr(self, "_server", None)
        if server is not None:
            server.stop()


# -- autoscaling ------------------------------------------------------------------------------------
class QueueKVAutoscalingPolicy:
    """Serve custom autoscaling policy (class form: Serve builds it once with policy_kwargs and calls it
    every control-loop tick). Replicas needed = the larger of
      (running + waiting sequences over all replicas) / target_requests_per_replica   (queue depth)
      (KV cache usage summed over replicas) / target_kv_usage                          (memory)
    Serve then applies upscaling/downscaling factors, upscale/downscale delays and min/max replicas.
    It is pickled by value into the Serve controller: keep it free of other module globals but the
    metric names."""

    def __init__(self, target_requests_per_replica: float = 16.0, target_kv_usage: float = 0.8) -> None:
        if not target_requests_per_replica > 0 or not 0 < target_kv_usage <= 1:
            raise ValueError("target_requests_per_replica must be > 0 and target_kv_usage in (0, 1]")
        self.target_requests = target_requests_per_replica
        self.target_kv = target_kv_usage

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}  # {metric: {replica_id: value averaged over look_back_period_s}}
        running = metrics.get(METRIC_RUNNING, {})
        if ctx.current_num_replicas == 0 or not running:
            return ctx.target_num_replicas, {}  # no reports yet (replicas starting): hold
        waiting = metrics.get(METRIC_WAITING, {})
        kv = metrics.get(METRIC_KV_USAGE, {})
        by_queue = (sum(running.values()) + sum(waiting.values())) / self.target_requests
        by_kv = sum(kv.values()) / self.target_kv
        return max(by_queue, by_kv), {}


# -- the ingress: the fleet router behind Serve's HTTP proxy ------------------------------------------
class TokenmillIngress:
    """The ingress deployment class (wrapped by serve.ingress() in build_app): the router's FastAPI app,
    built at replica start by __serve_build_asgi_app__, fed the replicas' URLs from their handles."""

    def __init__(self, replicas: list[DeploymentHandle], router_config: dict[str, Any] | None = None,
                 sync_interval_s: float = 1.0) -> None:
        self._handles = replicas
        self._router_config = router_config or {}
        self._interval = sync_interval_s
        self._urls: list[str] = []
        self._router: Any = None
        self._task: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self) -> Any:
        # Serve 2.60 calls this after __init__, on the loop that will serve the app's requests, so the
        # sync task below runs where the router's set_replicas must be called.
        from tokenmill.router import Router, RouterConfig

        self._urls = await self._discover()
        self._router = Router(RouterConfig(**self._router_config), replicas=self._urls)
        self._task = asyncio.get_running_loop().create_task(self._sync_forever())
        return self._router.app

    async def _discover(self) -> list[str]:
        """The URLs of every running replica of every group (one broadcast per group)."""
        urls: list[str] = []
        for h in self._handles:
            try:
                infos = await h.broadcast("info").results_async(timeout_s=10, return_exceptions=True)
            except Exception:  # no running replica yet (DeploymentUnavailableError), or a timeout
                continue
            urls += [i["url"] for i in infos if isinstance(i, dict)]
        return sorted(set(urls))

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval if self._urls else min(self._interval, 0.25))
            try:
                urls = await self._discover()
            except Exception:
                logger.exception("tokenmill ingress: replica discovery failed")
                continue
            if urls != self._urls:
                logger.info("tokenmill ingress: replicas %s", urls)
                self._urls = urls
                self._router.set_replicas(urls)

    async def fleet(self) -> dict[str, Any]:
        """For run_ray, tests and operators (through a handle): the router's view of the fleet."""
        if self._router is None:
            return {}
        return self._router.fleet_load()

    def __del__(self) -> None:
        if self._task is not None:
            self._task.cancel()


# -- building and running the application ---------------------------------------------------------
@dataclass
class ReplicaGroup:
    """One deployment: replicas with the same tokenmill flags and Ray resources."""

    args: argparse.Namespace  # tokenmill serve's flags (host and port are not used)
    name: str = "TokenmillReplica"
    num_replicas: int = 1  # the fixed count, or the initial one when autoscaling
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    min_replicas: int | None = None  # autoscaling when max_replicas > min_replicas
    max_replicas: int | None = None
    target_requests_per_replica: float = 16.0
    target_kv_usage: float = 0.8
    # Serve's AutoscalingConfig fields to override (upscale_delay_s, downscale_delay_s, look_back_period_s,
    # metrics_interval_s, upscaling_factor, ...).
    autoscaling_overrides: dict[str, Any] = field(default_factory=dict)

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Serve's autoscaling_config, or None for a fixed num_replicas."""
        lo = self.min_replicas if self.min_replicas is not None else self.num_replicas
        hi = self.max_replicas if self.max_replicas is not None else max(self.num_replicas, lo)
        if lo < 1:
            # The traffic bypasses Serve's handles, so Serve could never see a request to scale up from zero.
            raise ValueError("--min-replicas: must be >= 1 (a fleet scaled to zero would never come back)")
        if lo > hi:
            raise ValueError(f"--min-replicas {lo} is above --max-replicas {hi}")
        if not lo <= self.num_replicas <= hi:
            raise ValueError(f"--replicas {self.num_replicas} must lie within --min-replicas {lo} and "
                             f"--max-replicas {hi}")
        # (checked here: in the Serve controller a bad target is a traceback a second, and no fleet)
        if not (math.isfinite(self.target_requests_per_replica) and self.target_requests_per_replica > 0):
            raise ValueError(f"--target-requests-per-replica: must be > 0, got {self.target_requests_per_replica}")
        if not 0 < self.target_kv_usage <= 1:
            raise ValueError(f"--target-kv-usage: a KV cache usage in (0, 1], got {self.target_kv_usage}")
        if lo == hi:
            return None
        policy_kwargs = {"target_requests_per_replica": self.target_requests_per_replica,
                         "target_kv_usage": self.target_kv_usage}
        return {"min_replicas": lo, "max_replicas": hi, "initial_replicas": self.num_replicas,
                "upscale_delay_s": 10.0, "downscale_delay_s": 120.0,
                "policy": {"policy_function": QueueKVAutoscalingPolicy, "policy_kwargs": policy_kwargs},
                **self.autoscaling_overrides}


def _serve_log_level(args: argparse.Namespace) -> str:
    level = (getattr(args, "log_level", None) or "info").upper()
    return level if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "DEBUG"  # (uvicorn's trace)


def replica_actor_options(options: dict[str, Any]) -> dict[str, Any]:
    """A replica deployment's ray_actor_options with Ray Serve's start-up GC freeze turned off
    (RAY_SERVE_FREEZE_GC_ON_STARTUP, merged into the caller's runtime_env): Serve freezes the heap
    once the replica is built, engines included, and a frozen engine in a reference cycle is never
    reclaimed when the model pool drops it. The replica freezes its own heap before its first
    engine instead (engine/gc_heap.py)."""
    env = dict(options.get("runtime_env") or {})
    env["env_vars"] = {"RAY_SERVE_FREEZE_GC_ON_STARTUP": "0", **(env.get("env_vars") or {})}
    return {**options, "runtime_env": env}


def build_app(groups: Sequence[ReplicaGroup], router_config: dict[str, Any] | None = None,
              sync_interval_s: float = 1.0, ingress_options: dict[str, Any] | None = None) -> Application:
    """The Serve application: one deployment per group, and the ingress (bound to all of them)."""
    from ray import serve

    if not groups:
        raise ValueError("build_app: at least one replica group")
    if len({g.name for g in groups}) != len(groups):
        raise ValueError("build_app: replica groups need distinct names")
    bound = []
    for g in groups:
        options: dict[str, Any] = {
            "name": g.name, "ray_actor_options": replica_actor_options(g.ray_actor_options),
            # The tokenmill server drains its own HTTP requests in __del__; Serve must wait for that.
            "graceful_shutdown_timeout_s": g.args.shutdown_timeout + 15,
            # Only control calls (info, load, health) come through Serve: the requests go over HTTP.
            "max_ongoing_requests": 100,
            # (Serve's access log would write a line per control call: the ingress polls every second)
            "logging_config": {"enable_access_log": False, "log_level": _serve_log_level(g.args)},
        }
        autoscaling = g.autoscaling_config()
        if autoscaling is None:
            options["num_replicas"] = g.num_replicas
        else:
            options["autoscaling_config"] = autoscaling
        bound.append(serve.deployment(TokenmillReplica).options(**options).bind(g.args))
    # Each ingress replica proxies every stream in flight: Serve's default of 5 concurrent would cap them.
    ingress_opts = {"name": "TokenmillIngress", "num_replicas": 1, "max_ongoing_requests": 10_000,
                    "ray_actor_options": {"num_cpus": 0}, **(ingress_options or {})}
    ingress = serve.deployment(serve.ingress()(TokenmillIngress)).options(**ingress_opts)
    return ingress.bind(bound, router_config, sync_interval_s)


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve", "run the replicas on a Ray cluster (tokenmill.ray)")
    g.add_argument("--replicas", type=int, default=1, help="tokenmill replicas (the initial count when autoscaling)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many (default: --replicas)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many (default: --replicas)")
    g.add_argument("--target-requests-per-replica", type=float, default=16.0,
                   help="autoscaling: running + waiting sequences per replica to aim for")
    g.add_argument("--target-kv-usage", type=float, default=0.8,
                   help="autoscaling: mean KV cache usage per replica to aim for (0 to 1)")
    g.add_argument("--autoscaling-config", default=None, metavar="JSON",
                   help='Serve AutoscalingConfig fields to override, e.g. \'{"upscale_delay_s": 5}\'')
    g.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    g.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="default: 1 when --device is cuda, or auto on a cluster with GPUs; else 0")
    g.add_argument("--replica-resources", default=None, metavar="JSON",
                   help='custom Ray resources per replica, e.g. \'{"h100": 1}\'')
    g.add_argument("--router-policy", default="kv_aware", choices=("kv_aware", "least_loaded", "round_robin"),
                   help="the fleet router's policy")
    g.add_argument("--app-name", default="tokenmill", help="the Serve application's name")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (auto, or HEAD_IP:6379); default: start a local one on this machine")
    g.add_argument("--ray-num-cpus", type=int, default=None,
                   help="CPUs of the local cluster started without --ray-address (default: this machine's)")


def _operator_key(args: argparse.Namespace) -> None:
    """Replicas with tenants show their KV events to the operator's key (--api-key) only: without
    one, the replicas and the ingress router share a key made here (idempotent: both builders call it)."""
    if getattr(args, "tenants", None) is not None and not args.api_key:
        args.api_key = secrets.token_urlsafe(32)


def groups_from_args(args: argparse.Namespace, cluster_gpus: float = 0.0) -> list[ReplicaGroup]:
    _operator_key(args)
    gpus = args.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if args.device == "cuda" or (args.device == "auto" and cluster_gpus > 0) else 0.0
    options: dict[str, Any] = {"num_cpus": args.num_cpus_per_replica, "num_gpus": gpus}
    if not (math.isfinite(args.num_cpus_per_replica) and args.num_cpus_per_replica >= 0):
        raise ValueError(f"--num-cpus-per-replica: must be >= 0, got {args.num_cpus_per_replica}")
    if not (math.isfinite(gpus) and gpus >= 0):
        raise ValueError(f"--num-gpus-per-replica: must be >= 0, got {gpus}")
    if args.replica_resources:
        options["resources"] = _json_object(args.replica_resources, "--replica-resources")
        bad = [k for k, v in options["resources"].items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0]
        if bad:
            raise ValueError(f"--replica-resources: {bad[0]!r} needs a number >= 0")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    group = ReplicaGroup(args, num_replicas=args.replicas, ray_actor_options=options,
                         min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         target_requests_per_replica=args.target_requests_per_replica,
                         target_kv_usage=args.target_kv_usage,
                         autoscaling_overrides=_json_object(args.autoscaling_config or "{}", "--autoscaling-config"))
    group.autoscaling_config()  # (ranges and targets checked here, not in the Serve controller)
    return [group]


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag}: not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise ValueError(f"{flag}: a JSON object, got {type(v).__name__}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from tokenmill.server.serve import add_arguments

    p = argparse.ArgumentParser(prog="python -m tokenmill.ray",
                                description="tokenmill replicas on Ray Serve behind the fleet router")
    add_arguments(p)  # tokenmill serve's flags, the Ray ones among them
    return p


def app_builder(builder_args: dict[str, Any]) -> Application:
    """For `serve run tokenmill.ray:app_builder argv="--replicas 2 --model DIR"` and Serve config
    files (`import_path: tokenmill.ray:app_builder`, `args: {argv: "..."}`). The flags are
    this module's (tokenmill serve's and the Ray ones); --host/--port are Serve's http_options there."""
    argv = builder_args.get("argv", [])
    args = build_parser().parse_args(shlex.split(argv) if isinstance(argv, str) else list(argv))
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    return build_app(groups_from_args(args, gpus), router_config_from_args(args))


def wait_for_fleet(handle: DeploymentHandle, n: int, timeout: float = 120.0) -> dict[str, Any]:
    """Waits until the ingress (its handle from serve.run) has exactly n healthy replicas; returns its
    router's fleet_load()."""
    deadline = time.monotonic() + timeout
    while True:
        fleet = handle.fleet.remote().result(timeout_s=timeout)
        healthy = [u for u, load in fleet.items() if load.get("healthy", True)]
        if len(healthy) == n == len(fleet):
            return fleet
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ingress has {len(healthy)} healthy replicas of {len(fleet)} after "
                               f"{timeout:g} s, not {n}")
        time.sleep(0.2)


def router_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    _operator_key(args)
    config: dict[str, Any] = {"policy": args.router_policy, "max_body_bytes": args.max_body_size}
    if args.api_key:
        config["replica_api_key"] = args.api_key  # the router's own calls to the replicas (KV events)
    if getattr(args, "tenants", None) is not None:  # the replicas' tenants: keys, salts, fleet-wide limits
        from tokenmill.ops.tenants import load_tenants

        config["tenants"] = getattr(args, "tenants_config", None) or load_tenants(args.tenants)
    return config


def run_ray(args: argparse.Namespace) -> int:
    """`tokenmill serve --ray`: deploys the replicas and the router on Ray Serve (args: tokenmill serve's
    flags and add_ray_arguments'), serves on --host/--port until SIGINT/SIGTERM, then tears down.
    Every flag is checked, and on a cluster of its own the address and the resources, before Ray
    starts: a mistake is a one-line ValueError, not a cluster waiting forever or a traceback."""
    import copy

    from tokenmill.server.serve import bind_socket, check_args

    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    own_cluster = args.ray_address is None
    # What each replica will check (on a cluster of this machine's own, its models' folders too)
    check_args(copy.copy(args), models=own_cluster, probe_device=False)
    groups_from_args(copy.copy(args))  # (Ray's own flags, before a cluster is started for them)
    if own_cluster:  # the proxy will listen there: taken now, a clear error
        bind_socket(args.host, args.port).close()
    apply_lean_ray_env(loopback=own_cluster)
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ValueError("--ray needs Ray Serve: pip install 'tokenmill[ray]'") from e

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    if own_cluster:  # one machine: the replicas listen on 127.0.0.1 whatever --host the proxy has
        init_local_ray(args.ray_num_cpus)
    else:
        ray.init(address=args.ray_address)
    # Ray's handler aborts the process on SIGTERM, leaving its daemons behind: until serving, a
    # SIGTERM unwinds through the teardown below as Ctrl-C does.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, interrupt)
    deployed = False
    try:
        groups = groups_from_args(args, ray.cluster_resources().get("GPU", 0.0))
        if own_cluster:
            _check_resources(groups, ray.cluster_resources())
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            deployed = True  # (from here a failure leaves an application to delete)
            handle = serve.run(build_app(groups, router_config_from_args(args)), name=args.app_name,
                               route_prefix="/")
        except RuntimeError as e:  # (RayTaskError is one too) a replica failed: say why, in one line
            raise ValueError(f"the replicas did not start: {_deployment_error(serve, args.app_name) or e}") from None
        fleet = wait_for_fleet(handle, sum(g.num_replicas for g in groups))
        logger.info("serving on http://%s:%d through %d replicas: %s", args.host, args.port, len(fleet),
                    ", ".join(fleet))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        logger.info("stopping: draining the replicas")
        serve.delete(args.app_name)
        deployed = False
        return 0
    finally:
        if own_cluster:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        elif deployed:  # (a cluster of others: what failed or was interrupted half-way goes)
            with contextlib.suppress(Exception):
                serve.delete(args.app_name)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _check_resources(groups: Sequence[ReplicaGroup], cluster: dict[str, float]) -> None:
    """A cluster started here has what it has: replicas asking for more would wait for it forever."""
    need: dict[str, float] = {}
    for g in groups:
        n = g.num_replicas  # (the initial count when autoscaling: at least --min-replicas)
        o = g.ray_actor_options
        for k, v in (("CPU", o.get("num_cpus", 1)), ("GPU", o.get("num_gpus", 0)), *(o.get("resources") or {}).items()):
            need[k] = need.get(k, 0.0) + n * float(v or 0)
    short = [(k, v) for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9]
    if short:
        k, v = short[0]
        flag = {"CPU": "--num-cpus-per-replica (or --ray-num-cpus)", "GPU": "--num-gpus-per-replica"}.get(
            k, "--replica-resources")
        raise ValueError(f"the replicas need {v:g} {k} and the local Ray cluster has {cluster.get(k, 0.0):g}: "
                         f"lower --replicas or {flag}")


def _deployment_error(serve: Any, app: str) -> str | None:
    """The message Serve keeps for a deployment that failed (a replica's constructor raised)."""
    try:
        status = serve.status().applications[app]
        failed = [d for d in status.deployments.values() if "FAIL" in str(d.status) or "UNHEALTHY" in str(d.status)]
        for d in failed or list(status.deployments.values()):
            if d.message:  # (a replica's traceback: its last exception's message is the reason)
                last = [ln for ln in d.message.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", ln)]
                return last[-1].split(": ", 1)[1] if last else " ".join(d.message.split())[-2000:]
        return status.message or None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (getattr(args, "log_level", None) or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_ray(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (SIGINT, or SIGTERM before serving: the cluster is torn down)
        return 130


if __name__ == "__main__":
    sys.exit(main())
