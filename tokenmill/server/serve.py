"""`tokenmill serve`: load the model, then run the HTTP API under uvicorn until a signal.

The port is claimed first (bound and listening: a busy port fails in a second, not after the
model loaded); connections made while the model loads wait in the backlog and are answered
once it has, so /health answers 200 as soon as anything answers.
SIGTERM or SIGINT stops admitting (the listening socket closes; requests arriving on open
connections get 503), lets in-flight requests finish for up to --shutdown-timeout seconds,
stops the engine thread and exits with status 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn

from tokenmill.engine.gc_heap import freeze_startup_heap
from tokenmill.engine_args import add_engine_arguments, engine_config_from_args
from tokenmill.server.pool import PoolConfig

logger = logging.getLogger("tokenmill.server")
DEMO_MODEL_NAME = "tokenmill-demo"  # the served name of the built-in demo model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for benchmarks and tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout: float,
                 detail: Callable[[], str] = lambda: "") -> None:
    """Waits until a `tokenmill serve` process started by a benchmark or test answers 200 on
    /health. RuntimeError (with detail(), e.g. its log) if it exits or does not answer in time."""
    import httpx

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}{detail()}")
        try:
            if httpx.get(base_url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the server did not answer /health within {timeout:g} s{detail()}")
        time.sleep(0.1)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port, opened before the model loads (uvicorn serves it once
    the app starts; connections made meanwhile wait in the backlog); ValueError naming the flag
    when the address is taken or not this machine's. IPv6 only for a host with a colon, as uvicorn
    decides, so "localhost" is 127.0.0.1 and not whatever getaddrinfo lists first."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port: must be in [0, 65535], got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: restart over TIME_WAIT
    try:
        sock.bind((host, port))
        # Listening now, not at startup: two sockets with SO_REUSEADDR may both bind one port
        # until one listens, so only listening claims it.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is already in use by another process; "
                             f"stop it or choose another --port") from e
        raise ValueError(f"--host {host!r} --port {port}: cannot bind ({e.strerror or e})") from e
    return sock


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, many_models=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root-path", default="",
                   help="the path prefix a proxy in front strips (uvicorn's root_path): links and the "
                   "OpenAPI schema carry it")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the folder's name); with one --model only")
    pool = p.add_argument_group("model pool", "several models in one server (--model repeated, or --models)")
    pool.add_argument("--models", default=None, metavar="YAML",
                      help="the models to serve with per-model settings, and tiers (README: Several models in "
                           "one server)")
    pool.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                      help="memory for the active models' weights and KV caches together; models beyond it are "
                           "parked, least recently used first (default: no limit on CPU, "
                           "--gpu-memory-utilization of the GPU)")
    pool.add_argument("--host-memory-budget", type=float, default=None, metavar="GIB",
                      help="host memory for parked models' weights; beyond it the least recently used go back "
                           "to disk (default: half the available RAM)")
    pool.add_argument("--swap-quantum", type=float, default=None, metavar="S",
                      help="a busy model is parked for a waiting one only after both had this long (default 2)")
    pool.add_argument("--model-load-timeout", type=float, default=None, metavar="S",
                      help="how long a request waits for its model to be brought back, then 503 (default 120)")
    p.add_argument("--admin-api-key", default=os.environ.get("TOKENMILL_ADMIN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the admin routes (POST /v1/models/ID/load, "
                        "/unload, /pin); default: --api-key (or set TOKENMILL_ADMIN_API_KEY)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="answer 429 when this many sequences are already waiting beyond the places --max-num-seqs "
                   "leaves free (default: no limit)")
    p.add_argument("--max-body-size", type=int, default=8 * 2**20, metavar="BYTES",
                   help="larger request bodies get 413")
    p.add_argument("--responses-store-mb", type=float, default=64, metavar="MB",
                   help="memory for the Responses API's stored responses (store: true; previous_response_id, "
                        "GET /v1/responses/ID), least recently used out first; 0 keeps none (default 64)")
    p.add_argument("--metric-names", default="tokenmill", choices=["tokenmill", "vllm"],
                   help="vllm: /metrics shows its series under vLLM's names (vllm:num_requests_waiting, "
                        "vllm:kv_cache_usage_perc, ...), for tools built to read vLLM's (the Kubernetes inference "
                        "gateway, vLLM's production stack and dashboards)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a chat request's own chat_template (vLLM's flag; off: such a request is a 400, as a "
                        "template runs in the server's process)")
    rag = p.add_argument_group("RAG", "vector stores (OpenAI's /v1/files and /v1/vector_stores) and the "
                                      "file_search tool")
    rag.add_argument("--vector-store", default=None, metavar="DIR|URL",
                     help="where vector stores and files are kept: a folder (kept across restarts), or a Qdrant "
                          "server's URL (shared by replicas); default: in memory")
    rag.add_argument("--vector-store-api-key", default=os.environ.get("QDRANT_API_KEY"),
                     help="the Qdrant server's API key (default: $QDRANT_API_KEY)")
    rag.add_argument("--rag-embedding-model", default=None, metavar="NAME",
                     help="the served embedding model new vector stores use (default: the one served)")
    rag.add_argument("--rag-reranker", default=None, metavar="NAME",
                     help="a served reranker (a one-label classifier) that reorders each search's nearest chunks")
    rag.add_argument("--rag-excerpt-order", choices=["score", "document"], default="score",
                     help="file_search's excerpts in the prompt: best first, or as the files hold them (the same "
                          "prompt for questions that find the same excerpts: their KV is cached; a tool's "
                          "excerpt_order overrides it)")
    p.add_argument("--kv-transfer", action="store_true",
                   help="prefill/decode disaggregation: take prefills whose KV a decode worker takes "
                        "(kv_transfer_params) and the KV transfer routes (/v1/kv_transfer), for the holder of "
                        "--kv-transfer-key only; a fleet router with --prefill workers uses them")
    p.add_argument("--kv-transfer-key", default=os.environ.get("TOKENMILL_KV_TRANSFER_KEY"),
                   help="the key a fleet router sends with KV transfers (required with --kv-transfer: KV written "
                        "into the prefix cache is served to every prompt with those blocks; or set "
                        "TOKENMILL_KV_TRANSFER_KEY)")
    p.add_argument("--kv-hold-timeout", type=float, default=30.0, metavar="S",
                   help="how long a prefill's KV is held for its decode worker (default 30)")
    p.add_argument("--kv-transfer-sources", action="append", default=None, metavar="URL[,URL...]",
                   help="the prefill workers' base URLs this server may pull KV from (repeatable; a router "
                        "passes its own to the replicas it starts); default: any URL the key's holder names")
    p.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (or set TOKENMILL_API_KEY); with "
                        "--tenants it opens /v1/models and /v1/kv_events only (the operator's, a fleet router's)")
    p.add_argument("--tenants", default=None, metavar="YAML",
                   help="tenants: hashed API keys, priority, SLO class, rate limits, max_tokens cap and models per "
                        "tenant (README: Tenants and keys); the generation and embedding routes then take tenants' "
                        "keys only")
    from tokenmill.server.tools import PARSERS

    p.add_argument("--tool-call-parser", choices=["auto", *PARSERS], default="auto",
                   help="how tool calls appear in the model's text with tool_choice auto: hermes (Qwen2.5, Qwen3), "
                        "llama3_json (Llama 3.x), mistral; auto (default) infers it from the chat template")
    from tokenmill.server.reasoning import REASONING_PARSERS

    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="return a thinking model's <think> section as `reasoning`, apart from `content`: "
                        "deepseek_r1 (DeepSeek-R1, QwQ, Qwen3 *-Thinking-2507) or qwen3 (Qwen3 hybrid models)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: tool_choice auto is always enabled")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--log-level", default=argparse.SUPPRESS, type=str.lower,
                   choices=["debug", "info", "warning", "error", "critical"], help="default: info")
    from tokenmill.ray import add_ray_arguments

    p.add_argument("--ray", action="store_true",
                   help="run --replicas replicas on a Ray cluster behind the fleet router (tokenmill/ray.py; "
                   "needs the `ray` extra); --host/--port are then Ray Serve's proxy")
    add_ray_arguments(p)


def kv_transfer_sources(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--kv-transfer-sources as one list (each use may hold several, comma-separated); None if not given."""
    given = getattr(args, "kv_transfer_sources", None)
    if given is None:
        return None
    return tuple(u.strip() for v in given for u in v.split(",") if u.strip())


def pool_from_args(args: argparse.Namespace, probe_device: bool = True) -> tuple[list, list, PoolConfig]:
    """The pool's model specs, tiers and settings from the flags (and --models); probe_device:
    several models on CUDA without --memory-budget get a share of the device's memory, read here."""
    from tokenmill.engine.model_runner import available_ram_bytes
    from tokenmill.server.models_file import ModelEntry, build_pool_config, check_model, read_models_file, served_name

    gib = 2**30
    base = engine_config_from_args(args)
    paths = args.model or []
    if args.models is not None and paths:
        raise ValueError("--models: give the models in the file or with --model, not both")
    settings: dict[str, float] = {}
    raw_tiers: list = []
    if args.models is not None:
        if args.served_model_name is not None:
            raise ValueError("--served-model-name: with --models, name each model in the file (`name`)")
        models, raw_tiers, settings = read_models_file(args.models, base, args.tool_call_parser,
                                                       args.reasoning_parser, probe_device)
    else:
        if args.served_model_name is not None and len(paths) > 1:
            raise ValueError("--served-model-name: names one model; with several --model flags each is served "
                             "under its folder's name (or name them in a --models file)")
        models = []
        for path in paths or [None]:
            config = engine_config_from_args(args, path)
            task = check_model(config, probe_device)  # (every model now, not at its first request)
            name = args.served_model_name or (DEMO_MODEL_NAME if path is None else served_name(config.model))
            models.append(ModelEntry(name, config, tool_call_parser=args.tool_call_parser,
                                     reasoning_parser=args.reasoning_parser, task=task))

    def gib_flag(flag: str, key: str) -> int | None:
        v = getattr(args, flag)
        v = settings.get(key) if v is None else v
        if v is None:
            return None
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"--{flag.replace('_', '-')}: must be a positive number of GiB, got {v!r}")
        return int(v * gib)

    budget = gib_flag("memory_budget", "memory_budget")
    if budget is None and len(models) > 1 and probe_device and base.resolve_device().type == "cuda":
        import torch

        budget = int(torch.cuda.mem_get_info(base.resolve_device())[1] * base.gpu_memory_utilization)
    host = gib_flag("host_memory_budget", "host_memory_budget")
    if host is None and len(models) > 1:
        host = available_ram_bytes() // 2
    # A flag beats the file, which beats the default.
    quantum = args.swap_quantum if args.swap_quantum is not None else settings.get("swap_quantum", 2.0)
    timeout = args.model_load_timeout if args.model_load_timeout is not None else settings.get("load_timeout", 120.0)
    if not quantum >= 0:
        raise ValueError(f"--swap-quantum: must be >= 0, got {quantum}")
    if not timeout > 0:
        raise ValueError(f"--model-load-timeout: must be > 0, got {timeout}")
    pool_config = PoolConfig(memory_budget=budget, host_memory_budget=host, swap_quantum_s=quantum,
                             load_timeout_s=timeout, max_queue=args.max_queue)
    specs, tiers = build_pool_config(models, raw_tiers, pool_config)
    return specs, tiers, pool_config


def run(args: argparse.Namespace) -> int:
    specs, tiers, pool_config = check_args(args)
    sock = bind_socket(args.host, args.port)
    try:
        return _run(args, specs, tiers, pool_config, sock)
    finally:
        sock.close()


def check_args(args: argparse.Namespace, models: bool = True,
               probe_device: bool = True) -> tuple[list, list, PoolConfig]:
    """tokenmill serve's flags checked, each fault a ValueError naming its flag, before anything
    loads; returns the model pool's config. `serve --ray` checks them before it starts a cluster:
    without the models on a cluster of others (they need only be on its nodes), and without
    opening the device (pool_from_args' probe_device) in a driver that serves nothing."""
    if args.max_queue is not None and args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1 (every request waits for at least one step), "
                         f"got {args.max_queue}")
    if getattr(args, "kv_transfer", False) and not getattr(args, "kv_transfer_key", None):
        raise ValueError("--kv-transfer: needs --kv-transfer-key (or TOKENMILL_KV_TRANSFER_KEY), the key a fleet "
                         "router sends with KV transfers: without it anyone could write into the prefix cache")
    hold = getattr(args, "kv_hold_timeout", 30.0)
    if not (math.isfinite(hold) and 0 < hold <= 3600):
        raise ValueError(f"--kv-hold-timeout: seconds in (0, 3600], got {hold!r}")
    sources = kv_transfer_sources(args)
    if sources is not None:
        if not sources:
            raise ValueError("--kv-transfer-sources: give at least one prefill worker's base URL")
        from tokenmill.server.kv_sources import source_url

        for url in sources:
            if source_url(url) is None:
                raise ValueError(f"--kv-transfer-sources: a prefill worker's base URL (http or https, no query, "
                                 f"fragment or user info), got {url!r}")
    if args.max_body_size < 1:
        raise ValueError(f"--max-body-size: must be a positive number of bytes, got {args.max_body_size}")
    if not args.responses_store_mb >= 0 or args.responses_store_mb == float("inf"):  # (NaN too)
        raise ValueError(f"--responses-store-mb: must be a number of megabytes >= 0, got {args.responses_store_mb}")
    if not args.shutdown_timeout >= 0:  # (NaN too)
        raise ValueError(f"--shutdown-timeout: must be >= 0 seconds, got {args.shutdown_timeout}")
    if getattr(args, "vector_store", None) is not None:
        try:
            import qdrant_client  # noqa: F401
        except ImportError:
            raise ValueError("--vector-store: vector stores need qdrant-client: pip install 'tokenmill[rag]'") from None
    if args.tenants is not None:  # a bad file fails before any model loads
        from tokenmill.ops.tenants import load_tenants

        args.tenants_config = load_tenants(args.tenants)
    return pool_from_args(args, probe_device) if models else ([], [], PoolConfig())


def build_server_app(args: argparse.Namespace, specs: list, tiers: list, pool_config: PoolConfig,
                     where: Callable[[], str]) -> tuple[Any, Any]:
    """`tokenmill serve`'s app and model pool, the models loaded; the app's lifespan starts the pool's
    engine thread and, on shutdown, lets it finish what it has. where() names the address (logged)."""
    from tokenmill.server.api import GatewaySettings, build_app
    from tokenmill.server.pool import ModelPool

    # What is alive now lives as long as the server; the pool, the app and the engines are made after
    # the freeze and stay collectable (a dropped model's engine is reclaimed).
    freeze_startup_heap()
    pool = ModelPool(specs, pool_config, make_ctx=lambda spec, front: None)
    tenants = getattr(args, "tenants_config", None)
    if tenants is None and getattr(args, "tenants", None) is not None:
        from tokenmill.ops.tenants import load_tenants

        tenants = load_tenants(args.tenants)
    settings = GatewaySettings(max_body_bytes=args.max_body_size, api_key=args.api_key,
                               admin_api_key=args.admin_api_key, tenants=tenants,
                               responses_store_bytes=int(getattr(args, "responses_store_mb", 64) * 2**20),
                               trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
                               metric_names=getattr(args, "metric_names", "tokenmill"),
                               vector_store=getattr(args, "vector_store", None),
                               vector_store_api_key=getattr(args, "vector_store_api_key", None),
                               rag_embedding_model=getattr(args, "rag_embedding_model", None),
                               rag_reranker=getattr(args, "rag_reranker", None),
                               rag_excerpt_order=getattr(args, "rag_excerpt_order", "score"),
                               kv_transfer=getattr(args, "kv_transfer", False),
                               kv_transfer_key=getattr(args, "kv_transfer_key", None),
                               kv_hold_s=getattr(args, "kv_hold_timeout", 30.0),
                               kv_transfer_sources=kv_transfer_sources(args))
    app = build_app(pool, tiers, settings)
    for spec in specs:
        logger.info("loading %s from %s", spec.name, spec.config.model)
    pool.load_initial()
    for e in pool.entries.values():
        if e.engine is not None:
            eng = e.engine
            logger.info("model %s: %d KV blocks of %d tokens, max_model_len=%d, device=%s, dtype=%s", e.name,
                        eng.block_manager.num_blocks, eng.config.block_size, eng.max_model_len, eng.device, eng.dtype)
    names = ", ".join(list(pool.entries) + [t.name for t in tiers])

    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        pool.start(asyncio.get_running_loop())
        if getattr(args, "vector_store", None) is not None:  # (a folder or a server: opened now, not by a request)
            await app.state.retrieval.ready()
        logger.info("serving %s on %s", names, where())
        yield
        app.state.draining = True
        await app.state.retrieval.aclose()
        await asyncio.to_thread(pool.stop)
        logger.info("engine stopped")

    app.router.lifespan_context = lifespan
    return app, pool


def _run(args: argparse.Namespace, specs: list, tiers: list, pool_config: PoolConfig, sock: socket.socket) -> int:
    def where() -> str:
        host, port = sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    app, pool = build_server_app(args, specs, tiers, pool_config, where)
    level = getattr(args, "log_level", None) or "info"
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level.lower(), access_log=False,
                               root_path=args.root_path, timeout_graceful_shutdown=args.shutdown_timeout,
                               log_config=None)
    server = _Server(uv_config, on_exit=lambda: setattr(app.state, "draining", True))
    try:
        server.run(sockets=[sock])
    finally:  # the lifespan stops it; where uvicorn never started, the engine thread must stop here
        pool.stop()
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn's Server re-raises the caught signal after a graceful shutdown, so the process
    dies by the signal; a server that drained cleanly should exit 0 instead."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            if not self.should_exit:
                logger.info("received %s: draining in-flight requests", signal.Signals(sig).name)
            self.should_exit = True

