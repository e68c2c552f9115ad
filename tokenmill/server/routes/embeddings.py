"""/v1/embeddings: an embedding model's pooled, normalized vectors, as OpenAI returns them.

`encoding_format` float or base64 (little-endian float32, what the openai client asks for by
default and decodes); `dimensions` truncates and renormalizes, for models trained for it
(Matryoshka: `is_matryoshka` or `matryoshka_dimensions` in config.json), as vLLM allows it.
"""

from __future__ import annotations

import base64
import math
import struct
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.ops.energy import sum_compute
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError, bad_request, error_response
from tokenmill.server.gateway import Gateway
from tokenmill.server.protocol import EmbeddingRequest
from tokenmill.server.routes import body
from tokenmill.server.streaming import collect_finished, unless_disconnected

# Inputs per request: OpenAI's limit (LangChain's OpenAIEmbeddings sends up to 1,000 at a time).
MAX_INPUTS = 2048


def register(app: FastAPI, gw: Gateway) -> None:
    @app.post("/v1/embeddings", openapi_extra=body(EmbeddingRequest))
    @gw.route
    async def embeddings(request: Request) -> Response:
        ctx, req, arrival = await gw.open_request(request, EmbeddingRequest, tasks=("embed",), precheck=_checked)
        mc = ctx.llm_engine.model_config
        if req.dimensions is not None:
            if not mc.matryoshka:
                raise APIError(400, f"dimensions: `{ctx.name}` was not trained for truncated embeddings "
                               f"(no is_matryoshka in its config.json)", param="dimensions")
            if not 1 <= req.dimensions <= mc.hidden_size:
                raise APIError(400, f"dimensions: must be in [1, {mc.hidden_size}], got {req.dimensions}",
                               param="dimensions")
        params = _params(req)
        prompts = [ctx.llm_engine.truncate_prompt(ids, params)[0]
                   for _, ids in await ctx.prompts(req.input, param="input")]
        if any(not p for p in prompts):
            raise APIError(400, "input: an input is empty", param="input")
        rid = f"embd-{uuid.uuid4().hex}"
        reqs = [(f"{rid}-{i}", ctx.prompt_dict(None, ids, None), params) for i, ids in enumerate(prompts)]
        group = await ctx.submit(reqs, 0, arrival, max_seqs=MAX_INPUTS, param="input")

        async def collect() -> Response:
            final = await collect_finished(ctx.engine, group)
            data = []
            for i, (r, _, _) in enumerate(reqs):
                out = final[r]
                if out.error is not None or out.embedding is None:
                    return error_response(ctx.engine_error(out))
                data.append({"object": "embedding", "index": i,
                             "embedding": _encode(_truncate(out.embedding, req.dimensions), req.encoding_format)})
            n = sum(len(p) for p in prompts)
            use: dict[str, Any] = {"prompt_tokens": n, "total_tokens": n}
            compute = sum_compute(final[r].compute for r, _, _ in reqs)
            if compute is not None:
                use["compute"] = compute
            return JSONResponse({"object": "list", "data": data, "model": ctx.name, "usage": use})

        return await unless_disconnected(request, collect())


def _params(req: EmbeddingRequest) -> SamplingParams:
    return SamplingParams(max_tokens=1, temperature=0, _prompt_only=True,
                          truncate_prompt_tokens=req.truncate_prompt_tokens)


def _checked(req: EmbeddingRequest) -> None:
    """The body's own checks, before the model is waited for (Gateway.open_request)."""
    try:
        _params(req).validate()
    except ValueError as e:
        raise bad_request(e) from None


def _truncate(vec: list[float], dims: int | None) -> list[float]:
    if dims is None or dims >= len(vec):
        return vec
    head = vec[:dims]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def _encode(vec: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return vec


