"""/health, /v1/models, /v1/models/{id}, /metrics, the model pool's admin routes: POST
/v1/models/{id}/load, /unload and /pin (behind the admin key, or the API key, when set), and
/v1/kv_events, the stream a fleet router follows (server/kv_events.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.routing import CascadePolicy
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.gateway import Gateway, Tier, pool_api_error
from tokenmill.server.kv_events import Subscriber
from tokenmill.server.metrics import CONTENT_TYPE
from tokenmill.server.pool import ACTIVE, PoolEntry, PoolError
from tokenmill.server.streaming import sse

# How often the KV event stream sends each model's load when it changed, and a heartbeat when idle.
LOAD_INTERVAL_S = 0.05
HEARTBEAT_S = 1.0


def register(app: FastAPI, gw: Gateway) -> None:
    pool = gw.pool

    def card(e: PoolEntry) -> dict[str, Any]:
        return {"id": e.name, "object": "model", "created": gw.created, "owned_by": "tokenmill",
                "root": e.spec.config.model, "max_model_len": e.max_model_len, "state": e.state,
                "pinned": e.spec.pinned, "size_bytes": e.footprint, "weight_bytes": e.weight_bytes or None,
                "kv_cache_bytes": e.kv_bytes or None,
                "last_used": None if e.last_used is None else int(e.last_used), "swaps": e.swaps,
                "error": e.error, "step_time_model": step_time_model(e)}

    def step_time_model(e: PoolEntry) -> dict[str, float] | None:
        """The model's step-time model as fitted on its own steps (engine/slo.py; a fleet simulator's
        input: bench disagg), while it is active."""
        ctx = e.ctx
        if ctx is None or e.state != ACTIVE or getattr(ctx, "llm_engine", None) is None:
            return None
        return ctx.llm_engine.step_model.snapshot()

    def tier_card(t: Tier) -> dict[str, Any]:
        p = t.policy
        route: dict[str, Any] = ({"policy": "cascade", "small": p.small, "strong": p.strong, "metric": p.metric,
                                  "threshold": p.threshold, "window": p.window, "margin": p.margin}
                                 if isinstance(p, CascadePolicy)
                                 else {"policy": "rules", "default": p.default, "rules": len(p.rules)})
        return {"id": t.name, "object": "model", "created": gw.created, "owned_by": "tokenmill", "root": None,
                "max_model_len": None, "state": "virtual", "models": t.models, "route": route}

    def entry_for(model_id: str) -> PoolEntry:
        e = pool.entry(model_id)
        if e is None:
            if model_id in gw.tiers:
                raise APIError(400, f"`{model_id}` is a tier (a route over {', '.join(gw.tiers[model_id].models)}); "
                               f"load, unload or pin its models", param="model")
            raise gw.unknown(model_id)
        return e

    async def small_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        except RecursionError:  # (as Gateway.parse: deeply nested JSON is the client's fault, not a 500)
            raise APIError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "body: must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> Response:
        if not pool.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return Response(status_code=200)

    # vLLM's: /ping is /health under SageMaker's name, /version the server's version
    app.add_api_route("/ping", health, methods=["GET", "POST"], include_in_schema=False)

    @app.get("/version")
    async def version() -> dict[str, str]:
        from tokenmill import __version__

        return {"version": __version__}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        shown = set(gw.visible(gw.check_auth(request, service=True)))  # a tenant sees its models only
        return {"object": "list",
                "data": [card(e) for e in pool.entries.values() if e.name in shown]
                + [tier_card(t) for t in gw.tiers.values() if t.name in shown]}

    @app.post("/v1/models/{model_id:path}/load")
    async def load(request: Request, model_id: str) -> dict[str, Any]:
        gw.check_admin(request)
        e = entry_for(model_id)
        try:
            swap = await pool.load(e.name)
        except PoolError as err:
            raise pool_api_error(err) from None
        return {**card(e), "swap": swap}

    @app.post("/v1/models/{model_id:path}/unload")
    async def unload(request: Request, model_id: str) -> dict[str, Any]:
        gw.check_admin(request)
        e = entry_for(model_id)
        to = (await small_body(request)).get("to", "parked")
        if to not in ("parked", "disk"):
            raise APIError(400, f"to: 'parked' (weights kept in host memory) or 'disk', got {to!r}", param="to")
        try:
            await pool.run_on_device(lambda: pool.unload(e.name, to_disk=to == "disk"))
        except PoolError as err:
            raise APIError(err.status, str(err), code="model_busy") from None
        return card(e)

    @app.post("/v1/models/{model_id:path}/pin")
    async def pin(request: Request, model_id: str) -> dict[str, Any]:
        gw.check_admin(request)
        e = entry_for(model_id)
        pinned = (await small_body(request)).get("pinned", True)
        if not isinstance(pinned, bool):
            raise APIError(400, f"pinned: true or false, got {pinned!r}", param="pinned")
        try:
            await pool.run_on_device(lambda: pool.pin(e.name, pinned))
        except PoolError as err:
            raise APIError(err.status, str(err), code="pin_conflict") from None
        if pinned:
            try:
                await pool.load(e.name)
            except PoolError as err:
                await pool.run_on_device(lambda: pool.pin(e.name, False))
                raise pool_api_error(err) from None
        return card(e)

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        tenant = gw.check_auth(request, service=True)
        if tenant is not None and not tenant.allows(model_id):
            gw.check_model(model_id, tenant)  # the 404 a tenant gets for a model it may not use
        if model_id in gw.tiers:
            return tier_card(gw.tiers[model_id])
        e = pool.entry(model_id)
        if e is None:
            raise gw.unknown(model_id)
        return card(e)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/kv_events")
    async def kv_events(request: Request) -> Response:
        """Server-Sent Events for a fleet router: a hello naming the models and their block sizes;
        per model a snapshot of the cached block keys, then their changes (numbered: a gap means
        resync); each model's load when it changes; a comment as heartbeat. Ends when the server
        drains."""
        gw.check_service(request)
        sub = Subscriber()
        hubs = [pool.kv_hub(name) for name in pool.entries]
        for hub in hubs:
            hub.subscribe(sub)

        def loads() -> dict[str, tuple[int, int, float]]:
            out = {}
            for e in pool.entries.values():
                st = e.front.stats if e.front is not None and e.state == "active" else None
                out[e.name] = ((st.num_requests_running, st.num_requests_waiting, round(st.kv_cache_usage_perc, 4))
                               if st is not None else (0, 0, 0.0))
            return out

        async def events() -> AsyncIterator[str]:
            try:
                yield sse({"type": "hello", "models": {h.model: h.block_size for h in hubs}, "started": gw.created})
                sent: dict[str, tuple[int, int, float]] = {}
                last_beat = time.monotonic()
                while not app.state.draining:
                    try:
                        event = await asyncio.wait_for(sub.queue.get(), LOAD_INTERVAL_S)
                    except asyncio.TimeoutError:
                        event = None
                    if sub.lost:  # fell behind: end the stream; the router reconnects for a fresh snapshot
                        return
                    out = []
                    if event is not None:
                        out.append(sse(event))
                        while not sub.queue.empty():
                            out.append(sse(sub.queue.get_nowait()))
                    for name, load in loads().items():
                        if sent.get(name) != load:
                            sent[name] = load
                            out.append(sse({"type": "load", "model": name, "running": load[0], "waiting": load[1],
                                            "kv_usage": load[2]}))
                    now = time.monotonic()
                    if not out and now - last_beat >= HEARTBEAT_S:
                        out.append(": ping\n\n")
                    if out:
                        last_beat = now
                        yield "".join(out)
            finally:
                for hub in hubs:
                    hub.unsubscribe(sub)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
