"""/health, /v1/models, /v1/models/{id} and /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.context import ServerContext
from tokenmill.server.errors import error_body
from tokenmill.server.metrics import CONTENT_TYPE


def register(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not ctx.engine.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        ctx.check_auth(request)
        return {"object": "list", "data": [ctx.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        ctx.check_auth(request)
        ctx.check_model(model_id)
        return ctx.model_card()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
