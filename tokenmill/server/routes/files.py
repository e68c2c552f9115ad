"""/v1/files: OpenAI's Files API, for the files that vector stores embed (purpose "assistants" or
"user_data"; other purposes are kept too). Files live in the RAG store (rag/store.py), each
tenant's apart; an upload is one multipart body, so --max-body-size bounds a file."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from tokenmill.server.errors import APIError
from tokenmill.server.gateway import Gateway

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def public(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as the API shows it: without the fields kept for the server (`_seq`: the creation
    order within a second, for lists; `_run`: which ingestion of a file is current)."""
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def owner_of(gw: Gateway, request: Request, admitting: bool = False) -> str | None:
    """The caller's tenant (auth checked): the owner of what it creates and the only one who sees it.
    admitting: a request that starts work (refused while the server drains)."""
    tenant = gw.check_auth(request)
    if admitting:
        gw.check_admitting()
    return tenant.name if tenant is not None else None


def list_page(objs: list[dict[str, Any]], limit: str, order: str, after: str | None, before: str | None,
              most: int = 100, keep: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """OpenAI's cursor pages over objects (oldest first in objs): limit in [1, most], order by
    creation, after/before an object's id (any object's: the cursor is placed before keep, a
    filter such as a purpose, picks the page's objects)."""
    key = "id"
    n = int(limit) if limit.isascii() and limit.isdigit() and len(limit) < 8 else 0
    if not 1 <= n <= most:
        raise APIError(400, f"limit: must be an integer in [1, {most}], got {limit!r}", param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order: must be 'asc' or 'desc', got {order!r}", param="order")
    objs = objs if order == "asc" else objs[::-1]
    for cursor, name in ((after, "after"), (before, "before")):
        if cursor is None:
            continue
        at = next((i for i, o in enumerate(objs) if o[key] == cursor), None)
        if at is None:
            raise APIError(400, f"{name}: no object {cursor!r} in this list", param=name)
        objs = objs[at + 1:] if name == "after" else objs[:at]
    if keep is not None:
        objs = [o for o in objs if keep(o)]
    page = objs[-n:] if before is not None and after is None else objs[:n]
    more = len(objs) > n
    return {"object": "list", "data": page, "first_id": page[0][key] if page else None,
            "last_id": page[-1][key] if page else None, "has_more": more}


def register(app: FastAPI, gw: Gateway) -> None:
    rag = gw.retrieval

    async def get_file(request: Request, file_id: str) -> tuple[str | None, dict[str, Any]]:
        owner = owner_of(gw, request)
        f = await rag.call("get", "file", file_id, owner)
        if f is None:
            raise APIError(404, f"No such File object: {file_id}", param="file_id", code="not_found")
        return owner, f

    @app.post("/v1/files", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}})
    async def upload_file(request: Request) -> Response:
        owner = owner_of(gw, request, admitting=True)
        await rag.ready()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "the body must be multipart/form-data with `file` and `purpose`", param="file")
        # The body counted as it arrives (one sent without a length is not stopped by the middleware),
        # then parsed from memory.
        limit, body = gw.settings.max_body_bytes, bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(413, f"request body exceeds {limit} bytes (--max-body-size bounds a file)",
                                   code="request_too_large")
        except ClientDisconnect:  # (gone mid-upload: nothing was stored, no one to answer)
            return Response(status_code=499)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except Exception as e:  # (a malformed multipart body, too many parts)
            raise APIError(400, f"malformed multipart body: {e}", param="file") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "file: is required (a file part)", param="file")
            if not isinstance(purpose, str) or purpose not in PURPOSES:
                raise APIError(400, f"purpose: must be one of {', '.join(PURPOSES)}, got {purpose!r}",
                               param="purpose")
            data = await upload.read()
            filename = (upload.filename or "file")[:512]
        finally:
            await form.close()
        obj = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(data),
               "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed",
               "status_details": None, "expires_at": None, "_seq": time.time_ns()}
        await rag.call("put_data", obj["id"], data)
        await rag.call("put", obj, owner)
        return JSONResponse(public(obj))

    @app.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, limit: str = "10000", order: str = "desc",
                         after: str | None = None, before: str | None = None) -> Response:
        owner = owner_of(gw, request)
        files = await rag.call("find", "file", owner)
        page = list_page(files, limit, order, after, before, most=10000,
                         keep=None if purpose is None else lambda f: f["purpose"] == purpose)
        page["data"] = [public(f) for f in page["data"]]
        return JSONResponse(page)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(request: Request, file_id: str) -> Response:
        return JSONResponse(public((await get_file(request, file_id))[1]))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        await get_file(request, file_id)
        data = await rag.call("get_data", file_id)
        if data is None:
            raise APIError(404, f"No such File object: {file_id}", param="file_id", code="not_found")
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Response:
        """The file goes; vector stores keep the chunks they made of it (as OpenAI's do)."""
        await get_file(request, file_id)
        await rag.call("delete", "file", file_id)
        await rag.call("delete_data", file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})
