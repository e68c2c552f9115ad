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
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType

import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.engine_args import add_engine_arguments, engine_config_from_args

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
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="answer 429 when this many sequences are already waiting (default: no limit)")
    p.add_argument("--max-body-size", type=int, default=8 * 2**20, metavar="BYTES",
                   help="larger request bodies get 413")
    p.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (or set TOKENMILL_API_KEY)")
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


def run(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    if args.max_queue is not None and args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1 (every request waits for at least one step), "
                         f"got {args.max_queue}")
    sock = bind_socket(args.host, args.port)
    try:
        return _run(args, config, sock)
    finally:
        sock.close()


def _run(args: argparse.Namespace, config: EngineConfig, sock: socket.socket) -> int:
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.server.api import ServerSettings, build_app
    from tokenmill.server.async_engine import AsyncEngine

    logger.info("loading %s", config.model)
    engine = LLMEngine(config)
    logger.info("model loaded: %d KV blocks of %d tokens, max_model_len=%d, device=%s, dtype=%s",
                engine.block_manager.num_blocks, config.block_size, engine.max_model_len, engine.device,
                engine.dtype)
    name = args.served_model_name or (DEMO_MODEL_NAME if args.model is None
                                      else os.path.basename(os.path.normpath(config.model)))
    async_engine = AsyncEngine(engine, max_queue=args.max_queue)
    settings = ServerSettings(served_model_name=name, model_path=config.model, max_queue=args.max_queue,
                              max_body_bytes=args.max_body_size, api_key=args.api_key,
                              tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser)
    app = build_app(async_engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        async_engine.start(asyncio.get_running_loop())
        host, port = sock.getsockname()[:2]
        logger.info("serving %s on http://%s:%d", name, f"[{host}]" if ":" in host else host, port)
        yield
        app.state.draining = True
        await asyncio.to_thread(async_engine.stop)
        logger.info("engine stopped")

    app.router.lifespan_context = lifespan
    level = getattr(args, "log_level", None) or "info"
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level.lower(), access_log=False,
                               timeout_graceful_shutdown=args.shutdown_timeout, log_config=None)
    server = _Server(uv_config, on_exit=lambda: setattr(app.state, "draining", True))
    server.run(sockets=[sock])
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

