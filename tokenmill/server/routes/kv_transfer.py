"""KV transfer for prefill/decode disaggregation (engine/kv_transfer.py; a fleet router's calls).

- A completion or chat request with `kv_transfer_params: {"do_remote_decode": true}` (vLLM's
  field) is a prefill: once it finishes, its prompt's blocks are held (--kv-hold-timeout) and the
  response's `kv_transfer_params` names them (`transfer_id`).
- GET /v1/kv_transfer/{transfer_id}?model=M&skip_blocks=K: the held blocks after the first K, as a
  safetensors payload, and the hold released (404 once taken or expired).
- POST /v1/kv_transfer?model=M with such a payload: its blocks go into this server's prefix cache
  under their keys; a request for the same prompt then computes only its last block. The chain is
  held (`hold_id`) until a request sent with `x-tokenmill-kv-release: ID` (and the key) ends, or
  --kv-hold-timeout passes, so a busy cache does not evict it before that request is admitted.

Off unless the server runs with --kv-transfer, and only for the holder of --kv-transfer-key (the
routes take it as `Authorization: Bearer KEY`, a prefill request in the x-tokenmill-kv-transfer-key
header): a payload written into the prefix cache is served to every request whose prompt has those
keys, and a hold pins cache blocks, so neither is a client's to make.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.kv_transfer import KVTransferError, decode, encode
from tokenmill.server.errors import APIError
from tokenmill.server.gateway import Gateway

MEDIA_TYPE = "application/octet-stream"
_HEADER_SLACK = 1 << 20  # a payload's safetensors header (its keys as hex) beyond the KV itself


def register(app: FastAPI, gw: Gateway) -> None:
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
        ctx = await gw.acquire(model_name(request), request=request)
        engine = ctx.llm_engine
        payload = await gw.pool.run_on_device(lambda: engine.export_kv(transfer_id, skip))
        if payload is None:
            raise APIError(404, f"no KV is held as {transfer_id!r} (taken already, or its hold expired)",
                           param="transfer_id", code="kv_transfer_not_found")
        data = await asyncio.to_thread(encode, payload)
        return Response(data, media_type=MEDIA_TYPE, headers={"x-kv-blocks": str(payload.num_blocks)})

    @app.post("/v1/kv_transfer")
    @gw.route
    async def import_kv(request: Request) -> JSONResponse:
        check(request)
        ctx = await gw.acquire(model_name(request), request=request)
        engine = ctx.llm_engine
        runner = engine.runner
        limit = engine.block_manager.num_blocks * runner.kv_bytes_per_block + _HEADER_SLACK
        data = await _read(request, limit)
        hold = (f"kvi-{uuid.uuid4().hex}", gw.settings.kv_hold_s)  # (until the request it was moved for ends)
        try:
            payload = await asyncio.to_thread(decode, data)
            got: dict[str, Any] = await gw.pool.run_on_device(lambda: engine.import_kv(payload, hold))
        except KVTransferError as e:
            raise APIError(400, f"KV payload: {e}", code="kv_transfer_mismatch") from None
        held = hold[0] in engine.kv_holds  # (read on the loop: a dict lookup)
        return JSONResponse({"object": "kv_transfer.import", "model": ctx.name, **got,
                             "hold_id": hold[0] if held else None})


async def _read(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is larger than the whole KV cache."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"a KV payload larger than this server's whole KV cache ({limit} bytes)",
                       code="request_too_large")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"a KV payload larger than this server's whole KV cache ({limit} bytes)",
                           code="request_too_large")
        parts.append(chunk)
    return b"".join(parts)
