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
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.ops.energy import sum_compute
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams, pooling_params
from tokenmill.server.context import ServerContext
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
        params = pooling_params(req.truncate_prompt_tokens)
        prompts = [ctx.llm_engine.truncate_prompt(ids, params)[0]
                   for _, ids in await ctx.prompts(req.input, param="input")]

        def answer(outs: list[RequestOutput], use: dict[str, Any]) -> Response:
            data = [{"object": "embedding", "index": i,
                     "embedding": _encode(_truncate(o.embedding or [], req.dimensions), req.encoding_format)}
                    for i, o in enumerate(outs)]
            return JSONResponse({"object": "list", "data": data, "model": ctx.name, "usage": use})

        return await run_pooled(request, ctx, "embd", prompts, params, 0, arrival, "input", answer)


async def run_pooled(request: Request, ctx: ServerContext, kind: str, prompts: list[list[int]],
                     params: SamplingParams, priority: int, arrival: float, param: str,
                     answer: Callable[[list[RequestOutput], dict[str, Any]], Response]) -> Response:
    """A pooling request's prompts (embeddings here, classifications and pair scores in score.py)
    run as one group: answer(the outputs in order, their usage), or the first engine error."""
    if any(not p for p in prompts):
        raise APIError(400, f"{param}: an input is empty", param=param)
    rid = f"{kind}-{uuid.uuid4().hex}"
    reqs = [(f"{rid}-{i}", ctx.prompt_dict(None, ids, None), params) for i, ids in enumerate(prompts)]
    group = await ctx.submit(reqs, priority, arrival, max_seqs=MAX_INPUTS, param=param)

    async def collect() -> Response:
        final = await collect_finished(ctx.engine, group)
        outs = []
        for r, _, _ in reqs:
            out = final[r]
            if out.error is not None or out.pooled is None:
                return error_response(ctx.engine_error(out))
            outs.append(out)
        n = sum(len(p) for p in prompts)
        use: dict[str, Any] = {"prompt_tokens": n, "total_tokens": n}
        compute = sum_compute(o.compute for o in outs)
        if compute is not None:
            use["compute"] = compute
        return answer(outs, use)

    return await unless_disconnected(request, collect())


def _checked(req: EmbeddingRequest) -> None:
    """The body's own checks, before the model is waited for (Gateway.open_request)."""
    try:
        pooling_params(req.truncate_prompt_tokens).validate()
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


