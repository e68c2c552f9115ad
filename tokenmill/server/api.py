"""The OpenAI-compatible HTTP API: FastAPI routes over an AsyncEngine.

Every failure a client can cause becomes a 4xx with an OpenAI-style error body; request
bodies are parsed and validated here (strict pydantic models, then the engine's own
checks) before anything reaches the engine, so the engine only ever sees valid requests.

`build_app` assembles the app: errors.py (error bodies, the body-size limit), context.py (the
engine, tokenizer and request preamble every route shares), streaming.py (SSE and response
pieces) and one module per endpoint family under routes/.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from tokenmill.server.async_engine import AsyncEngine
from tokenmill.server.context import ServerContext, ServerSettings
from tokenmill.server.errors import BodyLimitMiddleware, add_error_handlers
from tokenmill.server.routes import BODIES, admin, chat, completions, embeddings, tokenize

__all__ = ["ServerSettings", "build_app"]

# The endpoint families, registered in this order (which is the order of /openapi.json's paths).
FAMILIES = (admin, tokenize, completions, chat, embeddings)


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


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="tokenmill", version="0.1.0", description="OpenAI-compatible LLM inference server")
    _with_body_schemas(app)
    ctx = ServerContext(engine, settings, app)
    app.state.engine = engine
    app.state.metrics = ctx.metrics
    app.state.draining = False
    add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    for family in FAMILIES:
        family.register(app, ctx)
    return app
