"""KV transfer for prefill/decode disaggregation (engine/kv_transfer.py; a fleet router's calls).

- A completion or chat request with `kv_transfer_params: {"do_remote_decode": true}` (vLLM's
  field) is a prefill: once it finishes, its prompt's blocks are held (--kv-hold-timeout) and the
  response's `kv_transfer_params` names them (`transfer_id`).
- GET /v1/kv_transfer/{transfer_id}?model=M&skip_blocks=K: the held blocks after the first K, as a
  safetensors payload, and the hold released (404 once taken or expired, or for a parked model:
  parking lets every hold go, and the GET does not bring it back).
- DELETE /v1/kv_transfer/{transfer_id}?model=M: the hold released unread (a transfer given up on;
  404 when nothing is held so).
- POST /v1/kv_transfer?model=M with such a payload: its blocks go into this server's prefix cache
  under their keys; a request for the same prompt then computes only its last block. The chain is
  held (`hold_id`) until a request sent with `x-tokenmill-kv-release: ID` (and the key) ends or is
  refused before it runs (Gateway.let_go_of_import), or --kv-hold-timeout passes, so a busy cache
  does not evict it before that request is admitted.
- POST /v1/kv_transfer?model=M with a JSON body `{"source": URL, "transfer_id": ID, "skip_blocks":
  K, "source_model": M2}`: the same import, of the payload this server pulls itself from the
  prefill worker at URL (its GET, with this server's own key). The router's default: the KV
  crosses the network once, worker to replica, not twice through the router.

Off unless the server runs with --kv-transfer, and only for the holder of --kv-transfer-key (the
routes take it as `Authorization: Bearer KEY`, a prefill request in the x-tokenmill-kv-transfer-key
header): a payload written into the prefix cache is served to every request whose prompt has those
keys, and a hold pins cache blocks, so neither is a client's to make. (A pull makes this server GET
a URL's /v1/kv_transfer/ID path for the key's holder: the key is the fleet's alone; with
--kv-transfer-sources, only the prefill workers' URLs named there.)
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import ssl
import uuid
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.kv_transfer import KVTransferError, decode, encode
from tokenmill.server.errors import APIError
from tokenmill.server.gateway import Gateway
from tokenmill.server.kv_sources import source_key, source_url

MEDIA_TYPE = "application/octet-stream"
_HEADER_SLACK = 1 << 20  # a payload's safetensors header (its keys as hex) beyond the KV itself
_TRANSFER_ID = re.compile(r"kvx-[0-9a-f]{32}")  # (what a prefill answers: Gateway._kv_prefill)
PULL_TIMEOUT_S = 60.0  # a pull's whole GET at most (the router gives up by --disagg-timeout anyway)


def register(app: FastAPI, gw: Gateway) -> None:
    sources = gw.settings.kv_transfer_sources
    allowed = None if sources is None else frozenset(source_key(u) for u in sources)

    def check(request: Request) -> None:
        gw.check_kv_transfer(request, "authorization")
        gw.check_admitting()

    def model_name(request: Request) -> str:
        name = gw.check_model(request.query_params.get("model"))
        if name in gw.tiers:
            raise APIError(400, f"model: `{name}` is a tier; name one of its models", param="model")
        return name

    @app.get("/v1/kv_transfer/{transfer_id}")
    @gw.route
    async def export_kv(request: Request, transfer_id: str) -> Response:
        check(request)
        try:
            skip = int(request.query_params.get("skip_blocks", "0"))
        except ValueError:
            raise APIError(400, "skip_blocks: must be an integer", param="skip_blocks") from None
        if skip < 0:
            raise APIError(400, "skip_blocks: must be >= 0", param="skip_blocks")
        ctx = await gw.acquire(model_name(request), need_device=False, request=request)  # (404 on disk)
        engine = ctx.llm_engine  # (a parked model holds nothing: not brought back only to say so)
        payload = None if engine.parked else await gw.pool.run_on_device(lambda: engine.export_kv(transfer_id, skip))
        if payload is None:
            raise _not_held(transfer_id)
        data = await asyncio.to_thread(encode, payload)
        return Response(data, media_type=MEDIA_TYPE, headers={"x-kv-blocks": str(payload.num_blocks)})

    @app.delete("/v1/kv_transfer/{transfer_id}")
    @gw.route
    async def release_kv(request: Request, transfer_id: str) -> JSONResponse:
        check(request)
        ctx = await gw.acquire(model_name(request), need_device=False, request=request)  # (404 on disk)
        engine = ctx.llm_engine  # (a parked model holds nothing: parking let every hold go)
        if engine.parked or not await gw.pool.run_on_device(lambda: engine.release_kv_hold(transfer_id)):
            raise _not_held(transfer_id)
        return JSONResponse({"object": "kv_transfer.release", "transfer_id": transfer_id, "released": True})

    @app.post("/v1/kv_transfer")
    @gw.route
    async def import_kv(request: Request) -> Response:
        check(request)
        ctx = await gw.acquire(model_name(request), request=request)
        engine = ctx.llm_engine
        runner = engine.runner
        limit = engine.block_manager.num_blocks * runner.kv_bytes_per_block + _HEADER_SLACK
        if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            data = await _pull(request, gw.settings.kv_transfer_key or "", ctx.name, limit, allowed)
        else:
            data = await _read(request, limit)
        hold = (f"kvi-{uuid.uuid4().hex}", gw.settings.kv_hold_s)  # (until the request it was moved for ends)
        try:
            payload = await asyncio.to_thread(decode, data)
            if await request.is_disconnected():  # the router gave up: a hold nobody would release
                return Response(status_code=499)
            got: dict[str, Any] = await gw.pool.run_on_device(lambda: engine.import_kv(payload, hold))
        except KVTransferError as e:
            raise APIError(400, f"KV payload: {e}", code="kv_transfer_mismatch") from None
        if await request.is_disconnected():  # (left while it imported: nobody would release the hold)
            await gw.pool.run_on_device(lambda: engine.release_kv_hold(hold[0]))
            return Response(status_code=499)
        held = hold[0] in engine.kv_holds  # (read on the loop: a dict lookup)
        return JSONResponse({"object": "kv_transfer.import", "model": ctx.name, **got, "bytes": len(data),
                             "hold_id": hold[0] if held else None})


def _not_held(transfer_id: str) -> APIError:
    return APIError(404, f"no KV is held as {transfer_id!r} (taken already, or its hold expired)",
                    param="transfer_id", code="kv_transfer_not_found")


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every pull, from the CA bundle httpx uses (a client would otherwise build
    its own for each pull: 25 ms on the event loop)."""
    return httpx.create_ssl_context()


def _source(value: Any, allowed: frozenset[tuple[str, str, int, str]] | None) -> str:
    """The pull's source URL, or 400 (not a base URL) or 403 (not among --kv-transfer-sources)."""
    url = source_url(value)
    if url is None:
        raise APIError(400, f"source: the prefill worker's base URL (http or https), got {str(value)[:200]!r}",
                       param="source")
    if allowed is not None and source_key(url) not in allowed:
        raise APIError(403, f"source: {url} is not among this server's --kv-transfer-sources", param="source",
                       code="kv_transfer_source_not_allowed")
    return url


async def _pull(request: Request, key: str, model: str, limit: int,
                allowed: frozenset[tuple[str, str, int, str]] | None) -> bytes:
    """The payload a pull names, fetched from its source (the body: {"source", "transfer_id",
    "skip_blocks", "source_model"}); 400 for a bad body, 502 when the source does not give it."""
    try:
        body = json.loads(await _read(request, 1 << 16, "a KV pull's body larger than {limit} bytes"))
    except (ValueError, RecursionError):
        raise APIError(400, "a KV pull: the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, "a KV pull: the body must be a JSON object")
    unknown = set(body) - {"source", "transfer_id", "skip_blocks", "source_model"}
    if unknown:
        raise APIError(400, f"a KV pull: unknown field(s) {sorted(unknown)}", param=sorted(unknown)[0])
    source, tid = _source(body.get("source"), allowed), body.get("transfer_id")
    skip, src_model = body.get("skip_blocks", 0), body.get("source_model", model)
    if not isinstance(tid, str) or not _TRANSFER_ID.fullmatch(tid):
        raise APIError(400, "transfer_id: the prefill's kv_transfer_params.transfer_id", param="transfer_id")
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise APIError(400, "skip_blocks: must be an integer >= 0", param="skip_blocks")
    if not isinstance(src_model, str) or not src_model:
        raise APIError(400, "source_model: the model's name on the prefill worker", param="source_model")

    def failed(why: str) -> APIError:
        return APIError(502, f"the KV source {source} {why}", type_="api_error", code="kv_transfer_source_failed")

    async def get() -> bytes:
        parts, size = [], 0
        # (no proxies from the environment: the request carries the fleet's key)
        async with httpx.AsyncClient(timeout=httpx.Timeout(PULL_TIMEOUT_S, connect=5.0), verify=_tls(),
                                     trust_env=False) as http:
            async with http.stream("GET", f"{source}/v1/kv_transfer/{tid}", headers={"authorization": f"Bearer {key}"},
                                   params={"model": src_model, "skip_blocks": skip}) as r:
                if r.status_code != 200:  # (its body is not read: the source may be anything the key holder named)
                    raise failed(f"answered {r.status_code}")
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise failed(f"sent more than this server's whole KV cache ({limit} bytes)")
                    parts.append(chunk)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(get(), PULL_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise failed(f"sent nothing whole in {PULL_TIMEOUT_S:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise failed(f"could not be read: {type(e).__name__}: {e}") from None


async def _read(request: Request, limit: int, what: str = "a KV payload larger than {limit} bytes (this "
                "server's whole KV cache)") -> bytes:
    """The body, refused (413, what says so) as soon as it is larger than limit (a payload's: the
    whole KV cache)."""
    length = request.headers.get("content-length")
    too_large = APIError(413, what.format(limit=limit), code="request_too_large")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)
