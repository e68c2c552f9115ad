"""OpenAI-style errors: every failure a client can cause becomes a 4xx with an error body
{"error": {"message", "type", "param", "code"}}, and so do the server's own (5xx).

Routes raise APIError; the handlers installed by `add_error_handlers` turn it (and FastAPI's,
Starlette's and unexpected exceptions) into that body.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path

if TYPE_CHECKING:
    from tokenmill.ops.tenants import LimitExceeded

logger = logging.getLogger("tokenmill.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")
        self.code = code
        self.headers = headers


_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def invalid_key_error() -> APIError:
    """A missing or unknown API key (a server's, or a fleet router's with tenants)."""
    return APIError(401, "invalid or missing API key", code="invalid_api_key")


def limit_error(e: LimitExceeded) -> APIError:
    """A tenant's limit as OpenAI answers one: 429, rate_limit_exceeded, Retry-After (a server's,
    or a fleet router's holding the limit for the fleet)."""
    return APIError(429, e.message, code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after_s)})


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.type, e.code), status_code=e.status,
                        headers=e.headers)


def bad_request(e: ValueError) -> APIError:
    """The engine's ValueErrors start with the parameter at fault: "max_tokens: ..."."""
    msg = str(e)
    head, sep, _ = msg.partition(":")
    param = head if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head) else None  # "tools[0].function.name"
    return APIError(400, msg, param=param)


def validation_error(e: ValidationError) -> APIError:
    def field_path(err: dict) -> str | None:
        # Union members add their type to the location ("stop", "list[str]", 0); keep the field path.
        loc = [str(x) for x in err["loc"]
               if isinstance(x, int) or not (x in _TYPE_TAGS or "[" in str(x) or str(x)[:1].isupper())]
        return ".".join(loc) or None

    errors = e.errors()
    param = field_path(errors[0])
    msg = errors[0]["msg"]
    if sum(field_path(x) == param for x in errors) > 1:
        msg = f"matches none of the accepted types (got {errors[0]['input']!r:.80})"
    return APIError(400, f"{param or 'body'}: {msg}", param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def add_error_handlers(app: FastAPI) -> None:
    """APIError, Starlette's HTTP errors (404 route, 405 method) and anything unexpected, as error bodies."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))


class BodyLimitMiddleware:
    """Answers 413 before reading a body whose Content-Length is over the limit. Bodies sent
    without a length (chunked) are counted as they are read (see `ServerContext.parse`)."""

    def __init__(self, app: Any, max_bytes: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt  # path prefixes whose routes bound their bodies themselves

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not (self.exempt and get_route_path(scope).startswith(self.exempt)):
            for k, v in scope.get("headers", []):
                if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                    body = error_body(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
                    return await JSONResponse(body, status_code=413)(scope, receive, send)
        await self.app(scope, receive, send)
