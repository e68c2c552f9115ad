"""/v1/vector_stores: OpenAI's Vector Stores API over the RAG store, with files embedded in the
background by a served embedding model (server/retrieval.py) and searched by cosine similarity.

Served: create, list, retrieve, modify, delete; a store's files (add, list, retrieve, update
attributes, delete, content) and file batches (create, retrieve, cancel, list files); search, with
OpenAI's attribute filters. A file's status, a store's file_counts, usage_bytes and status, a
batch's status are read off its files when asked, so they never drift from what was embedded.
Each tenant sees only its own stores (the RAG store's owner).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.rag.chunking import Chunking
from tokenmill.server.context import REQUEST_TAGS
from tokenmill.server.errors import APIError, bad_request
from tokenmill.server.gateway import Gateway
from tokenmill.server.protocol import (
    FileBatchRequest,
    VectorStoreCreateRequest,
    VectorStoreFileRequest,
    VectorStoreFileUpdateRequest,
    VectorStoreSearchRequest,
    VectorStoreUpdateRequest,
)
from tokenmill.server.retrieval import expired
from tokenmill.server.routes import body
from tokenmill.server.routes.files import list_page, owner_of, public

STATUSES = ("in_progress", "completed", "failed", "cancelled")
MAX_FILES = 500  # per file batch (OpenAI's limit) and per create


def check_metadata(md: dict[str, Any] | None, param: str = "metadata") -> None:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512."""
    if md is None:
        return
    if len(md) > 16:
        raise APIError(400, f"{param}: at most 16 keys, got {len(md)}", param=param)
    for k, v in md.items():
        if len(k) > 64:
            raise APIError(400, f"{param}: keys are at most 64 characters, got {k[:64]!r}...", param=param)
        if isinstance(v, str) and len(v) > 512:
            raise APIError(400, f"{param}.{k}: values are at most 512 characters", param=param)


def counts(files: list[dict[str, Any]]) -> dict[str, int]:
    c = {s: sum(f["status"] == s for f in files) for s in STATUSES}
    return {**c, "total": len(files)}


def register(app: FastAPI, gw: Gateway) -> None:
    rag = gw.retrieval

    async def store_of(request: Request, vs_id: str, admitting: bool = False) -> tuple[str | None, dict[str, Any]]:
        owner = owner_of(gw, request, admitting)
        vs = await rag.call("get", "vector_store", vs_id, owner)
        if vs is None:
            raise APIError(404, f"No such vector store: {vs_id}", param="vector_store_id", code="not_found")
        return owner, vs

    async def shown(vs: dict[str, Any], owner: str | None) -> dict[str, Any]:
        """A store as the API shows it: file counts, usage and status from its files."""
        files = await rag.call("find", "vector_store.file", owner, vector_store_id=vs["id"])
        c = counts(files)
        status = "expired" if expired(vs) else "in_progress" if c["in_progress"] else "completed"
        return public({**vs, "file_counts": c, "status": status,
                       "usage_bytes": sum(f.get("usage_bytes", 0) for f in files)})

    def check_usable(vs: dict[str, Any]) -> None:
        if expired(vs):
            raise APIError(400, f"the vector store {vs['id']} has expired", param="vector_store_id",
                           code="vector_store_expired")

    async def add_file(owner: str | None, vs: dict[str, Any], file_id: str, attributes: dict[str, Any] | None,
                       chunking: Chunking, batch_id: str | None = None) -> dict[str, Any]:
        f = await rag.call("get", "file", file_id, owner)
        if f is None:
            raise APIError(404, f"No such File object: {file_id}", param="file_id", code="not_found")
        key = f"{vs['id']}/{file_id}"
        old = await rag.call("get", "vector_store.file", key, owner)
        if old is not None and old["status"] == "in_progress":
            raise APIError(400, f"the file {file_id} is already being added to {vs['id']}", param="file_id")
        vsf = {"id": file_id, "object": "vector_store.file", "usage_bytes": 0, "created_at": int(time.time()),
               "vector_store_id": vs["id"], "status": "in_progress", "last_error": None,
               "chunking_strategy": chunking.as_object(), "attributes": attributes or {}, "_run": uuid.uuid4().hex,
               "_seq": time.time_ns()}
        if batch_id is not None:
            vsf["batch_id"] = batch_id
        await rag.call("put", vsf, owner, vector_store_id=vs["id"], file_id=file_id, batch_id=batch_id)
        rag.start_ingest(owner, vs, vsf, chunking)
        return vsf

    def chunking_of(strategy: Any, where: str = "chunking_strategy") -> Chunking:
        try:
            return Chunking.from_request(strategy, where)
        except ValueError as e:
            raise bad_request(e) from None

    # -- stores ---------------------------------------------------------------------------------
    @app.post("/v1/vector_stores", openapi_extra=body(VectorStoreCreateRequest))
    async def create_store(request: Request) -> Response:
        tenant = gw.check_auth(request)
        gw.check_admitting()
        owner = tenant.name if tenant is not None else None
        req: VectorStoreCreateRequest = await gw.parse(request, VectorStoreCreateRequest)
        check_metadata(req.metadata)
        chunking = chunking_of(req.chunking_strategy)
        if req.file_ids is not None and len(req.file_ids) > MAX_FILES:
            raise APIError(400, f"file_ids: at most {MAX_FILES} files, got {len(req.file_ids)}", param="file_ids")
        model = rag.embedder(req.embedding_model, tenant)
        query_prompt, document_prompt = rag.prompts(model)
        if req.document_prompt is not None:
            document_prompt = req.document_prompt
        rag.check_chunking(model, chunking, "chunking_strategy", document_prompt)
        for fid in dict.fromkeys(req.file_ids or []):  # (all found before anything is made)
            if await rag.call("get", "file", fid, owner) is None:
                raise APIError(404, f"No such File object: {fid}", param="file_ids", code="not_found")
        now = int(time.time())
        vs = {"id": f"vs_{uuid.uuid4().hex[:24]}", "object": "vector_store", "created_at": now, "name": req.name,
              "description": req.description, "usage_bytes": 0, "last_active_at": now,
              "metadata": req.metadata or {}, "expires_after": None, "expires_at": None, "embedding_model": model,
              "_seq": time.time_ns(),
              "query_prompt": req.query_prompt if req.query_prompt is not None else query_prompt,
              "document_prompt": document_prompt}
        if req.expires_after is not None:
            vs["expires_after"] = req.expires_after.model_dump()
            vs["expires_at"] = now + req.expires_after.days * 86400
        dim = await embedding_dim(model, request)
        await rag.call("create_chunks", vs["id"], dim)
        await rag.call("put", vs, owner)
        for fid in dict.fromkeys(req.file_ids or []):
            await add_file(owner, vs, fid, None, chunking)
        return JSONResponse(await shown(vs, owner))

    async def embedding_dim(model: str, request: Request) -> int:
        return len((await rag.embed(model, ["dimension"], request))[0])

    @app.get("/v1/vector_stores")
    async def list_stores(request: Request, limit: str = "20", order: str = "desc", after: str | None = None,
                          before: str | None = None) -> Response:
        owner = owner_of(gw, request)
        page = list_page(await rag.call("find", "vector_store", owner), limit, order, after, before)
        page["data"] = [await shown(vs, owner) for vs in page["data"]]
        return JSONResponse(page)

    @app.get("/v1/vector_stores/{vs_id}")
    async def retrieve_store(request: Request, vs_id: str) -> Response:
        owner, vs = await store_of(request, vs_id)
        return JSONResponse(await shown(vs, owner))

    @app.post("/v1/vector_stores/{vs_id}", openapi_extra=body(VectorStoreUpdateRequest))
    async def modify_store(request: Request, vs_id: str) -> Response:
        owner, vs = await store_of(request, vs_id)
        req: VectorStoreUpdateRequest = await gw.parse(request, VectorStoreUpdateRequest)
        check_metadata(req.metadata)
        if req.name is not None:
            vs["name"] = req.name
        if req.metadata is not None:
            vs["metadata"] = req.metadata
        if "expires_after" in req.model_fields_set:
            vs["expires_after"] = req.expires_after.model_dump() if req.expires_after is not None else None
            vs["expires_at"] = None
        vs["last_active_at"] = now = int(time.time())
        if vs["expires_after"] is not None:
            vs["expires_at"] = now + vs["expires_after"]["days"] * 86400
        # (whole: a None expiry must be written, which a partial update cannot)
        await rag.call("put", vs, owner)
        return JSONResponse(await shown(vs, owner))

    @app.delete("/v1/vector_stores/{vs_id}")
    async def delete_store(request: Request, vs_id: str) -> Response:
        owner, vs = await store_of(request, vs_id)
        await rag.call("delete", "vector_store", vs_id)
        for f in await rag.call("find", "vector_store.file", owner, vector_store_id=vs_id):
            await rag.call("delete", "vector_store.file", f"{vs_id}/{f['id']}")
        for b in await rag.call("find", "vector_store.files_batch", owner, vector_store_id=vs_id):
            await rag.call("delete", "vector_store.files_batch", b["id"])
        rag.cancel_ingests(vs_id)
        await rag.call("drop_chunks", vs_id)
        return JSONResponse({"id": vs_id, "object": "vector_store.deleted", "deleted": True})

    # -- a store's files ------------------------------------------------------------------------
    async def file_of(request: Request, vs_id: str, file_id: str) -> tuple[str | None, dict[str, Any], dict]:
        owner, vs = await store_of(request, vs_id)
        vsf = await rag.call("get", "vector_store.file", f"{vs_id}/{file_id}", owner)
        if vsf is None:
            raise APIError(404, f"No file {file_id} in vector store {vs_id}", param="file_id", code="not_found")
        return owner, vs, vsf

    def status_filter(files: list[dict[str, Any]], filter: str | None) -> list[dict[str, Any]]:
        if filter is None:
            return files
        if filter not in STATUSES:
            raise APIError(400, f"filter: must be one of {', '.join(STATUSES)}, got {filter!r}", param="filter")
        return [f for f in files if f["status"] == filter]

    @app.post("/v1/vector_stores/{vs_id}/files", openapi_extra=body(VectorStoreFileRequest))
    async def create_store_file(request: Request, vs_id: str) -> Response:
        owner, vs = await store_of(request, vs_id, admitting=True)
        req: VectorStoreFileRequest = await gw.parse(request, VectorStoreFileRequest)
        check_usable(vs)
        check_metadata(req.attributes, "attributes")
        chunking = chunking_of(req.chunking_strategy)
        rag.check_chunking(vs["embedding_model"], chunking, "chunking_strategy", vs.get("document_prompt", ""))
        vsf = await add_file(owner, vs, req.file_id, req.attributes, chunking)
        await rag.touch(vs)
        return JSONResponse(public(vsf))

    @app.get("/v1/vector_stores/{vs_id}/files")
    async def list_store_files(request: Request, vs_id: str, limit: str = "20", order: str = "desc",
                               after: str | None = None, before: str | None = None,
                               filter: str | None = None) -> Response:
        owner, _ = await store_of(request, vs_id)
        files = status_filter(await rag.call("find", "vector_store.file", owner, vector_store_id=vs_id), filter)
        page = list_page(files, limit, order, after, before)
        page["data"] = [public(f) for f in page["data"]]
        return JSONResponse(page)

    @app.get("/v1/vector_stores/{vs_id}/files/{file_id}")
    async def retrieve_store_file(request: Request, vs_id: str, file_id: str) -> Response:
        return JSONResponse(public((await file_of(request, vs_id, file_id))[2]))

    @app.post("/v1/vector_stores/{vs_id}/files/{file_id}", openapi_extra=body(VectorStoreFileUpdateRequest))
    async def update_store_file(request: Request, vs_id: str, file_id: str) -> Response:
        owner, vs, vsf = await file_of(request, vs_id, file_id)
        req: VectorStoreFileUpdateRequest = await gw.parse(request, VectorStoreFileUpdateRequest)
        check_metadata(req.attributes, "attributes")
        vsf["attributes"] = req.attributes or {}
        # (the record first: an ingestion still running reads it when done and gives its later chunks these)
        await rag.call("update", "vector_store.file", f"{vs_id}/{file_id}", {"attributes": vsf["attributes"]})
        await rag.call("set_file_attributes", vs_id, file_id, vsf["attributes"])
        return JSONResponse(public(await rag.call("get", "vector_store.file", f"{vs_id}/{file_id}", owner) or vsf))

    @app.delete("/v1/vector_stores/{vs_id}/files/{file_id}")
    async def delete_store_file(request: Request, vs_id: str, file_id: str) -> Response:
        """The file leaves the store (its chunks with it); the file itself stays (DELETE /v1/files)."""
        await file_of(request, vs_id, file_id)
        await rag.call("delete", "vector_store.file", f"{vs_id}/{file_id}")
        rag.cancel_ingests(vs_id, file_id)
        await rag.call("delete_file_chunks", vs_id, file_id)
        return JSONResponse({"id": file_id, "object": "vector_store.file.deleted", "deleted": True})

    @app.get("/v1/vector_stores/{vs_id}/files/{file_id}/content")
    async def store_file_content(request: Request, vs_id: str, file_id: str) -> Response:
        """The file's chunks as the store keeps them (OpenAI's parsed content)."""
        await file_of(request, vs_id, file_id)
        chunks = await rag.call("file_chunks", vs_id, file_id)
        return JSONResponse({"object": "vector_store.file_content.page",
                             "data": [{"type": "text", "text": c["text"]} for c in chunks],
                             "has_more": False, "next_page": None})

    # -- file batches ---------------------------------------------------------------------------
    async def batch_of(request: Request, vs_id: str, batch_id: str) -> tuple[str | None, dict[str, Any]]:
        owner, _ = await store_of(request, vs_id)
        b = await rag.call("get", "vector_store.files_batch", batch_id, owner)
        if b is None or b["vector_store_id"] != vs_id:
            raise APIError(404, f"No file batch {batch_id} in vector store {vs_id}", param="batch_id",
                           code="not_found")
        return owner, b

    async def shown_batch(b: dict[str, Any], owner: str | None) -> dict[str, Any]:
        files = await rag.call("find", "vector_store.file", owner, vector_store_id=b["vector_store_id"],
                               batch_id=b["id"])
        c = counts(files)
        status = ("in_progress" if c["in_progress"] else "cancelled" if b.get("_cancelled")
                  else "failed" if c["failed"] and not c["completed"] else "completed")
        return public({**b, "file_counts": c, "status": status})

    @app.post("/v1/vector_stores/{vs_id}/file_batches", openapi_extra=body(FileBatchRequest))
    async def create_batch(request: Request, vs_id: str) -> Response:
        owner, vs = await store_of(request, vs_id, admitting=True)
        req: FileBatchRequest = await gw.parse(request, FileBatchRequest)
        check_usable(vs)
        if (req.file_ids is None) == (req.files is None):
            raise APIError(400, "file_ids: give file_ids or files, not both or neither", param="file_ids")
        if req.files is not None and (req.attributes is not None or req.chunking_strategy is not None):
            raise APIError(400, "files: each file carries its own attributes and chunking_strategy; the "
                           "batch-wide ones go with file_ids", param="files")
        items = ([(f.file_id, f.attributes, f.chunking_strategy) for f in req.files] if req.files is not None
                 else [(fid, req.attributes, req.chunking_strategy) for fid in req.file_ids or []])
        if not items or len(items) > MAX_FILES:
            raise APIError(400, f"file_ids: between 1 and {MAX_FILES} files, got {len(items)}", param="file_ids")
        plans = []
        for i, (fid, attrs, strategy) in enumerate(items):
            where = f"files[{i}]" if req.files is not None else ""
            check_metadata(attrs, f"{where}.attributes" if where else "attributes")
            param = f"{where}.chunking_strategy" if where else "chunking_strategy"
            plans.append((fid, attrs, chunking_of(strategy, param)))
            rag.check_chunking(vs["embedding_model"], plans[-1][2], param, vs.get("document_prompt", ""))
            if await rag.call("get", "file", fid, owner) is None:
                raise APIError(404, f"No such File object: {fid}", param="file_ids", code="not_found")
        b = {"id": f"vsfb_{uuid.uuid4().hex[:24]}", "object": "vector_store.files_batch",
             "created_at": int(time.time()), "vector_store_id": vs_id, "_seq": time.time_ns()}
        await rag.call("put", b, owner, vector_store_id=vs_id)
        for fid, attrs, chunking in dict((p[0], p) for p in plans).values():
            await add_file(owner, vs, fid, attrs, chunking, b["id"])
        await rag.touch(vs)
        return JSONResponse(await shown_batch(b, owner))

    @app.get("/v1/vector_stores/{vs_id}/file_batches/{batch_id}")
    async def retrieve_batch(request: Request, vs_id: str, batch_id: str) -> Response:
        owner, b = await batch_of(request, vs_id, batch_id)
        return JSONResponse(await shown_batch(b, owner))

    @app.post("/v1/vector_stores/{vs_id}/file_batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, vs_id: str, batch_id: str) -> Response:
        owner, b = await batch_of(request, vs_id, batch_id)
        files = await rag.call("find", "vector_store.file", owner, vector_store_id=vs_id, batch_id=batch_id)
        b["_cancelled"] = True
        await rag.call("put", b, owner, vector_store_id=vs_id)
        for f in files:
            if f["status"] == "in_progress":
                await rag.cancel_ingest(vs_id, f["id"])
        return JSONResponse(await shown_batch(b, owner))

    @app.get("/v1/vector_stores/{vs_id}/file_batches/{batch_id}/files")
    async def list_batch_files(request: Request, vs_id: str, batch_id: str, limit: str = "20", order: str = "desc",
                               after: str | None = None, before: str | None = None,
                               filter: str | None = None) -> Response:
        owner, _ = await batch_of(request, vs_id, batch_id)
        files = status_filter(await rag.call("find", "vector_store.file", owner, vector_store_id=vs_id,
                                             batch_id=batch_id), filter)
        page = list_page(files, limit, order, after, before)
        page["data"] = [public(f) for f in page["data"]]
        return JSONResponse(page)

    # -- search ---------------------------------------------------------------------------------
    @app.post("/v1/vector_stores/{vs_id}/search", openapi_extra=body(VectorStoreSearchRequest))
    @gw.route
    async def search_store(request: Request, vs_id: str) -> Response:
        owner, vs = await store_of(request, vs_id, admitting=True)
        req: VectorStoreSearchRequest = await gw.parse(request, VectorStoreSearchRequest)
        if owner is not None:  # a search is a tenant's request: its requests per minute and concurrency,
            gw.admit(gw.check_auth(request))  # and its retrieval runs as the tenant's (metrics, cache namespace)
            tags = REQUEST_TAGS.get()
            if tags is not None:
                tags["tenant"] = owner
        check_usable(vs)
        queries = [req.query] if isinstance(req.query, str) else req.query
        if not queries or not all(q.strip() for q in queries):
            raise APIError(400, "query: must be a non-empty string or list of strings", param="query")
        if len(queries) > 16:
            raise APIError(400, f"query: at most 16 queries, got {len(queries)}", param="query")
        ro = req.ranking_options
        results = await rag.search(owner, [vs], queries, req.max_num_results, req.filters,
                                   ro.score_threshold if ro is not None else None, request,
                                   ranker=ro.ranker if ro is not None else None)
        await rag.touch(vs)
        return JSONResponse({"object": "vector_store.search_results.page", "search_query": queries,
                             "data": [{"file_id": r["file_id"], "filename": r["filename"], "score": r["score"],
                                       "attributes": r["attributes"], "content": [{"type": "text", "text": r["text"]}]}
                                      for r in results],
                             "has_more": False, "next_page": None})
