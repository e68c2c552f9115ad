"""`tokenmill router`: the fleet router as a server, over given replicas or N local ones."""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import tempfile
import urllib.parse

from tokenmill.router.disagg import DISAGG_POLICIES, TRANSFER_MODES, DisaggConfig
from tokenmill.router.policy import POLICIES, KVAwareWeights
from tokenmill.router.router import Router, RouterConfig
from tokenmill.server.kv_sources import source_url

logger = logging.getLogger("tokenmill.router")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root-path", default="",
                   help="the path prefix a proxy in front strips (uvicorn's root_path); replicas are called "
                   "without it")
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="a replica's base URL, e.g. http://h1:8000 (repeatable)")
    p.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="start N local `tokenmill serve` replicas; the arguments the router does not know "
                   "(--model, --max-num-seqs, ...) are passed to each")
    p.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="a prefill worker's base URL (repeatable): a `tokenmill serve --kv-transfer`, as the replicas "
                   "must be; prefills go there when --disagg-policy says, and their KV to the decoding replica (with "
                   "--replicas N, the local replicas pull from these and the local prefill workers only)")
    p.add_argument("--prefill-replicas", type=int, default=0, metavar="N",
                   help="start N local prefill workers (with --replicas N: every local server gets --kv-transfer, "
                   "and the local replicas --kv-transfer-sources naming the prefill workers)")
    p.add_argument("--disagg-policy", choices=DISAGG_POLICIES, default=DisaggConfig.policy,
                   help="with prefill workers: auto sends a prefill there when its replica is decoding, the prompt "
                   "is long and the prefill workers keep up; always: every prompt of --disagg-min-tokens; never")
    p.add_argument("--disagg-min-tokens", type=int, default=DisaggConfig.min_tokens, metavar="N",
                   help="uncached prompt tokens from which a prefill may go to a prefill worker")
    p.add_argument("--disagg-max-queue-tokens", type=int, default=DisaggConfig.max_queue_tokens, metavar="N",
                   help="auto: a prefill worker with more prompt tokens queued than this is not asked")
    p.add_argument("--kv-transfer-mode", choices=TRANSFER_MODES, default=DisaggConfig.transfer,
                   help="pull: a decode replica fetches the KV from the prefill worker itself (it must reach the "
                   "worker's URL); relay: the router streams it from one to the other")
    p.add_argument("--disagg-timeout", type=float, default=DisaggConfig.timeout_s, metavar="S",
                   help="a remote prefill and its KV transfer at most (then the replica prefills itself)")
    p.add_argument("--kv-transfer-key", default=os.environ.get("TOKENMILL_KV_TRANSFER_KEY"),
                   help="the servers' --kv-transfer-key, sent with prefills and KV transfers (default: env "
                   "TOKENMILL_KV_TRANSFER_KEY; with local prefill workers, one made here)")
    p.add_argument("--replica-threads", type=int, default=None, metavar="T",
                   help="torch threads per local replica (default: the cores shared out among them)")
    p.add_argument("--replica-log-dir", default=None, help="where local replicas write their logs")
    p.add_argument("--policy", choices=POLICIES, default="kv_aware")
    p.add_argument("--kv-decode-weight", type=float, default=KVAwareWeights.decode_weight,
                   help="kv_aware: prompt tokens of prefill one running sequence is worth")
    p.add_argument("--kv-full", type=float, default=KVAwareWeights.kv_full,
                   help="kv_aware: KV cache usage from which a replica counts as full")
    p.add_argument("--max-retries", type=int, default=2, help="other replicas a failed request is tried on (0: off)")
    p.add_argument("--health-interval", type=float, default=1.0, metavar="S")
    p.add_argument("--health-timeout", type=float, default=2.0, metavar="S",
                   help="a replica slower than this to answer /health fails the check; after 3 in a row its open "
                   "streams move to another replica")
    p.add_argument("--tokenizer", default=None,
                   help="the folder whose tokenizer hashes prompts (default: each model's folder as replicas "
                   "report it, when on this machine)")
    p.add_argument("--replica-api-key", default=None,
                   help="the key the router uses for replicas' KV event streams and model lists (default: the "
                   "--api-key given to local replicas, else env TOKENMILL_API_KEY)")
    p.add_argument("--tenants", default=None, metavar="YAML",
                   help="the replicas' tenants file: the router then takes tenants' keys (401 otherwise), hashes "
                   "their prompts with their cache salt, and holds their max_concurrent_requests and "
                   "requests_per_minute across the fleet; with --replicas N the local replicas get it too")
    p.add_argument("--max-body-size", type=int, default=8 * 2**20, metavar="BYTES")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    if args.max_retries < 0:
        raise ValueError(f"--max-retries: must be >= 0, got {args.max_retries}")
    # Settings that would leave the router unable to serve (every replica down, a busy loop) or
    # serving wrongly are refused here, each naming its flag.
    for flag, v in (("--health-interval", args.health_interval), ("--health-timeout", args.health_timeout)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{flag}: must be a positive number of seconds, got {v!r}")
    if not (math.isfinite(args.kv_decode_weight) and args.kv_decode_weight >= 0):
        raise ValueError(f"--kv-decode-weight: must be >= 0, got {args.kv_decode_weight!r}")
    if not (math.isfinite(args.kv_full) and 0 < args.kv_full <= 1):
        raise ValueError(f"--kv-full: a KV cache usage in (0, 1], got {args.kv_full!r}")
    if args.max_body_size < 1:
        raise ValueError(f"--max-body-size: must be a positive number of bytes, got {args.max_body_size}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise ValueError(f"--shutdown-timeout: must be >= 0 seconds, got {args.shutdown_timeout!r}")
    if args.replica_threads is not None and args.replica_threads < 1:
        raise ValueError(f"--replica-threads: must be >= 1, got {args.replica_threads}")
    for url in args.replica:
        check_replica_url(url)
    for url in args.prefill:
        check_replica_url(url, "--prefill")
    both = {u.rstrip("/") for u in args.replica} & {u.rstrip("/") for u in args.prefill}
    if both:
        raise ValueError(f"--prefill: {', '.join(sorted(both))} given as a replica too; a server is one or the other")
    if args.disagg_min_tokens < 0 or args.disagg_max_queue_tokens < 0:
        raise ValueError("--disagg-min-tokens and --disagg-max-queue-tokens: must be >= 0")
    if not (math.isfinite(args.disagg_timeout) and args.disagg_timeout > 0):
        raise ValueError(f"--disagg-timeout: must be a positive number of seconds, got {args.disagg_timeout!r}")
    if (args.prefill or args.prefill_replicas) and not args.kv_transfer_key:
        raise ValueError("--prefill: needs --kv-transfer-key (or TOKENMILL_KV_TRANSFER_KEY), the key the servers "
                         "were started with (the router makes one only when it starts every server itself)")
    tenants = None
    if args.tenants is not None:
        from tokenmill.ops.tenants import load_tenants

        tenants = load_tenants(args.tenants)
    return RouterConfig(policy=args.policy, weights=KVAwareWeights(args.kv_decode_weight, args.kv_full),
                        max_retries=args.max_retries, health_interval_s=args.health_interval,
                        health_timeout_s=args.health_timeout,
                        tokenizer=args.tokenizer,
                        replica_api_key=args.replica_api_key or os.environ.get("TOKENMILL_API_KEY"),
                        max_body_bytes=args.max_body_size, tenants=tenants,
                        disagg=DisaggConfig(args.disagg_policy, args.disagg_min_tokens, args.disagg_max_queue_tokens,
                                            args.disagg_timeout, args.kv_transfer_mode),
                        kv_transfer_key=args.kv_transfer_key)


def run(args: argparse.Namespace, serve_args: list[str]) -> int:
    import uvicorn

    from tokenmill.router.replicas import LocalReplicas
    from tokenmill.server.serve import _Server, bind_socket

    if not args.replica and not args.replicas:
        raise ValueError("router: give replicas (--replica URL, repeatable) or --replicas N to start local ones")
    if serve_args and not (args.replicas or args.prefill_replicas):
        raise ValueError(f"unrecognized arguments: {' '.join(serve_args)} (serve arguments go with --replicas N)")
    if args.replicas < 0 or args.prefill_replicas < 0:
        raise ValueError("--replicas and --prefill-replicas: must be >= 0")
    if args.prefill_replicas and not (args.replicas or args.replica):
        raise ValueError("--prefill-replicas: prefill workers need replicas to decode (--replicas N or --replica URL)")
    if args.prefill_replicas or (args.prefill and args.replicas):
        if "--kv-transfer" not in serve_args:  # every local server moves KV
            serve_args = [*serve_args, "--kv-transfer"]
        if not args.kv_transfer_key and not (args.replica or args.prefill):
            args.kv_transfer_key = secrets.token_urlsafe(32)  # (all servers local: one of the router's making)
        if args.kv_transfer_key:  # local servers take it through their environment
            os.environ["TOKENMILL_KV_TRANSFER_KEY"] = args.kv_transfer_key
    if args.replicas or args.prefill_replicas:
        given = _serve_api_key(serve_args)
        if args.replica_api_key is None:  # local replicas behind a key: the router's own calls need it too
            args.replica_api_key = given or os.environ.get("TOKENMILL_API_KEY")  # (theirs by default too)
        if args.tenants is not None:
            serve_args = [*serve_args, "--tenants", args.tenants]
            # A replica with tenants opens its KV events and model list to the operator's key only:
            # without --api-key among their flags, local replicas take the router's (--replica-api-key,
            # or one made here) through their environment, not their command line.
            if args.replica_api_key is None:
                args.replica_api_key = secrets.token_urlsafe(32)
            if given is None:
                os.environ["TOKENMILL_API_KEY"] = args.replica_api_key
    config = config_from_args(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per health check otherwise
    sock = bind_socket(args.host, args.port)
    locals_: list[LocalReplicas] = []
    try:
        urls, prefill = list(args.replica), list(args.prefill)
        n_local = args.replicas + args.prefill_replicas
        if n_local:
            threads = args.replica_threads or max(1, (os.cpu_count() or 1) // n_local)
            log_dir = args.replica_log_dir or tempfile.mkdtemp(prefix="tokenmill-replicas-")
            for n, name in ((args.prefill_replicas, "prefill"), (args.replicas, "replica")):
                if not n:
                    continue
                own = serve_args
                sources = [*prefill, *(u for lr in locals_ for u in lr.urls)]  # (the prefill workers)
                if name == "replica" and sources:  # pulls from these only (added to any list given: it appends)
                    own = [*serve_args, "--kv-transfer-sources", ",".join(sources)]
                locals_.append(LocalReplicas(n, own, threads=threads, log_dir=log_dir, name=name))
                locals_[-1].start()
            logger.info("starting %d local replicas and %d prefill workers (logs in %s)", args.replicas,
                        args.prefill_replicas, log_dir)
            for local in locals_:
                local.wait_ready()
                (prefill if local.name == "prefill" else urls).extend(local.urls)
        router = Router(config, urls, prefill=prefill)
        app = router.app
        if locals_:
            inner = app.router.lifespan_context

            def lifespan(a):  # supervise the local replicas while serving
                import contextlib

                @contextlib.asynccontextmanager
                async def cm():
                    async with inner(a):
                        for local in locals_:
                            local.supervise()
                        yield

                return cm()

            app.router.lifespan_context = lifespan
        logger.info("router on http://%s:%d over %s (policy %s)%s", args.host, sock.getsockname()[1], ", ".join(urls),
                    config.policy, f"; prefill workers {', '.join(prefill)} (disagg {config.disagg.policy})"
                    if prefill else "")
        level = (getattr(args, "log_level", None) or "info").lower()
        server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=level, access_log=False,
                                        root_path=args.root_path,
                                        timeout_graceful_shutdown=args.shutdown_timeout, log_config=None),
                         on_exit=lambda: setattr(router, "draining", True))
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        for local in locals_:
            local.stop()
        sock.close()


def check_replica_url(url: str, flag: str = "--replica") -> None:
    """ValueError unless url is an http(s) base URL with a host (`127.0.0.1:8001` alone would be
    taken as scheme "127.0.0.1" and every call to it would fail)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{flag}: {url!r} is not a replica's base URL; give one like http://127.0.0.1:8001")
    try:
        port = u.port  # (raises on a port that is not a number or out of range)
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{flag}: {url!r} has a port that is not a number in [1, 65535]")
    if u.query or u.fragment or any(c in url for c in "?#@,"):
        # (userinfo too: httpx would send it as Basic auth in place of the keys' Bearer, and a decode
        # replica refuses to pull from such a URL; a comma separates --kv-transfer-sources)
        raise ValueError(f"{flag}: {url!r}: a base URL has no query, fragment, user info or comma")
    if source_url(url) is None:  # (what httpx, which calls it, reads otherwise; a replica would not pull from it)
        raise ValueError(f"{flag}: {url!r} is not a base URL httpx can call (spaces, control characters, "
                         "backslashes, or a host it reads otherwise)")


def _serve_api_key(serve_args: list[str]) -> str | None:
    """The --api-key among the serve flags (`--api-key K` or `--api-key=K`, the last one given, as
    argparse takes it); a malformed one is left for the replicas' own parser to report."""
    key = None
    for i, a in enumerate(serve_args):
        if a == "--api-key" and i + 1 < len(serve_args):
            key = serve_args[i + 1]
        elif a.startswith("--api-key="):
            key = a.split("=", 1)[1]
    return key
