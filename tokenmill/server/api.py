"""The OpenAI-compatible HTTP API: FastAPI routes over an AsyncEngine.

Every failure a client can cause becomes a 4xx with an OpenAI-style error body; request
bodies are parsed and validated here (strict pydantic models, then the engine's own
checks) before anything reaches the engine, so the engine only ever sees valid requests.

`build_app` assembles the app over a model pool (pool.py): errors.py (error bodies, the body-size
limit), gateway.py (body, auth, admission, which model or tier serves a request), context.py (one
model's engine and tokenizer, and the steps every route takes with them), streaming.py (SSE and
response pieces) and one module per endpoint family under routes/.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from tokenmill.server.async_engine import AsyncEngine
from tokenmill.server.context import ServerContext, ServerSettings
from tokenmill.server.errors import BodyLimitMiddleware, add_error_handlers
from tokenmill.server.gateway import Gateway, GatewaySettings, Tier
from tokenmill.server.pool import ModelPool, ModelSpec
from tokenmill.server.routes import (
    BODIES,
    admin,
    chat,
    completions,
    dashboard,
    embeddings,
    files,
    kv_transfer,
    ollama,
    responses,
    score,
    tokenize,
    vector_stores,
)

__all__ = ["GatewaySettings", "build_app"]

# The endpoint families, registered in this order (which is the order of /openapi.json's paths).
FAMILIES = (admin, tokenize, completions, chat, responses, embeddings, score, files, vector_stores, ollama,
            dashboard, kv_transfer)


def _with_body_schemas(app: FastAPI) -> None:
    """Adds the request models (and the models they use) to the OpenAPI components."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            _, defs = models_json_schema([(m, "validation") for m in BODIES],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app(pool: ModelPool, tiers: list[Tier], settings: GatewaySettings, retry_after_s: int = 1) -> FastAPI:
    """The app over the pool; it also gives the pool the way to build each model's ServerContext,
    so the pool's models load (pool.load_initial) after this."""
    app = FastAPI(title="tokenmill", version="0.1.0", description="OpenAI-compatible LLM inference server")
    _with_body_schemas(app)
    app.state.draining = False
    gw = Gateway(pool, tiers, settings, app)

    def make_ctx(spec: ModelSpec, front: AsyncEngine) -> ServerContext:
        ctx = ServerContext(front, ServerSettings(spec.name, spec.config.model, retry_after_s, spec.tool_call_parser,
                                                  spec.reasoning_parser, settings.trust_request_chat_template),
                            gw.metrics)
        tenants = gw.tenants
        if tenants is not None:  # the engine's outputs settle tenants' token reservations too
            observe = front.on_output

            def on_output(out: Any) -> None:
                try:
                    tenants.observe(out)
                finally:
                    if observe is not None:
                        observe(out)

            front.on_output = on_output
        return ctx

    pool.make_ctx = make_ctx
    app.state.pool = pool
    app.state.metrics = gw.metrics
    app.state.retrieval = gw.retrieval
    add_error_handlers(app)
    # (a KV payload is as large as the prompt's KV: its route counts it against the KV cache's size)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, exempt=("/v1/kv_transfer",))
    for family in FAMILIES:
        family.register(app, gw)
    return app
