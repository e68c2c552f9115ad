"""vLLM's pooling endpoints beyond embeddings: /classify, /score and /rerank (each also under /v1,
and /rerank under /v2, as Cohere's client calls it).

/classify: a classifier's label probabilities per input. /score and /rerank: the relevance of
text pairs (tokenmill/scoring.py): the cosine similarity of an embedding model's embeddings, or a
one-label classifier's (a reranker's) probability for the pair read as one prompt.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import pooling_params
from tokenmill.scoring import cosine, pair_ids, pair_indices
from tokenmill.server.context import ServerContext
from tokenmill.server.errors import APIError, bad_request
from tokenmill.server.gateway import Gateway
from tokenmill.server.protocol import ClassifyRequest, RerankRequest, ScoreRequest
from tokenmill.server.routes import body
from tokenmill.server.routes.embeddings import run_pooled


def register(app: FastAPI, gw: Gateway) -> None:
    async def classify(request: Request) -> Response:
        ctx, req, arrival = await gw.open_request(request, ClassifyRequest, tasks=("classify",), precheck=_checked)
        params = pooling_params(req.truncate_prompt_tokens)
        prompts = [ctx.llm_engine.truncate_prompt(ids, params)[0]
                   for _, ids in await ctx.prompts(req.input, param="input")]
        labels = ctx.llm_engine.model_config.labels

        def answer(outs: list[RequestOutput], use: dict[str, Any]) -> Response:
            data = []
            for i, out in enumerate(outs):
                probs = out.probs or []
                best = max(range(len(probs)), key=probs.__getitem__) if len(probs) > 1 else 0
                data.append({"index": i, "label": labels[best] if labels else None, "probs": probs,
                             "num_classes": len(probs)})
            return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                                 "model": ctx.name, "data": data, "usage": {**use, "completion_tokens": 0}})

        return await run_pooled(request, ctx, "pool", prompts, params, req.priority, arrival, "input", answer)

    async def score(request: Request) -> Response:
        ctx, req, arrival = await gw.open_request(request, ScoreRequest, tasks=("score",), precheck=_checked)
        one, two, names = req.texts()
        pairs = pair_indices(len(one), len(two), names)

        def answer(scores: list[float], use: dict[str, Any]) -> Response:
            data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
            return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                                 "model": ctx.name, "data": data, "usage": {**use, "completion_tokens": 0}})

        return await _score(request, ctx, req, arrival, one, two, pairs, names, answer)

    async def rerank(request: Request) -> Response:
        ctx, req, arrival = await gw.open_request(request, RerankRequest, tasks=("score",), precheck=_checked)
        docs = [d if isinstance(d, str) else d.text for d in req.documents]
        pairs = pair_indices(1, len(docs), ("query", "documents"))

        def answer(scores: list[float], use: dict[str, Any]) -> Response:
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[:req.top_n or None]
            results = [{"index": i, "relevance_score": scores[i]} | (
                {"document": {"text": docs[i]}} if req.return_documents else {}) for i in order]
            return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": ctx.name,
                                 "usage": use,
                                 "results": results})

        return await _score(request, ctx, req, arrival, [req.query], docs, pairs, ("query", "documents"), answer)

    for path, handler, model in (("/classify", classify, ClassifyRequest), ("/score", score, ScoreRequest),
                                 ("/rerank", rerank, RerankRequest)):
        routed = gw.route(handler)
        paths = [path, "/v1" + path] + (["/v2" + path] if path == "/rerank" else [])
        for p in paths:  # (the unversioned path is vLLM's documented one; the rest are aliases)
            app.add_api_route(p, routed, methods=["POST"], openapi_extra=body(model),
                              include_in_schema=p == "/v1" + path)


async def _score(request: Request, ctx: ServerContext, req: ScoreRequest | RerankRequest, arrival: float,
                 one: list[str], two: list[str], pairs: list[tuple[int, int]], names: tuple[str, str],
                 answer: Any) -> Response:
    """Scores the pairs: an embedding model embeds each distinct text once and compares the
    vectors; a reranker runs each pair as one prompt."""
    params = pooling_params(req.truncate_prompt_tokens)
    eng = ctx.llm_engine
    if eng.task == "embed":
        texts = list(dict.fromkeys(one + two))  # (a query scored against many documents is embedded once)
        prompts = [eng.truncate_prompt(await ctx.encode(t, param=names[0]), params)[0] for t in texts]
        at = {t: i for i, t in enumerate(texts)}

        def scores(outs: list[RequestOutput]) -> list[float]:
            vecs = [o.embedding or [] for o in outs]
            return [cosine(vecs[at[one[i]]], vecs[at[two[j]]]) for i, j in pairs]
    else:
        k = req.truncate_prompt_tokens
        limit = eng.max_model_len if k == -1 else k

        def encode() -> list[list[int]]:
            return [pair_ids(ctx.tokenizer, one[i], two[j], limit) for i, j in pairs]

        try:
            async with ctx.tokenize_lock:  # (the tokenizer has one user at a time; thousands of pairs take a while)
                prompts = await asyncio.to_thread(encode)
        except ValueError as e:
            param = "truncate_prompt_tokens" if str(e).startswith("truncate_prompt_tokens") else names[0]
            raise APIError(400, str(e) if param != names[0] else f"{names[0]}: {e}", param=param) from None
        long = next((n for n, p in enumerate(prompts) if len(p) > eng.max_model_len), None)
        if long is not None:
            raise APIError(400, f"{names[1]}: pair {long} is {len(prompts[long])} tokens, more than max_model_len="
                           f"{eng.max_model_len}; shorten it or set truncate_prompt_tokens", param=names[1])

        def scores(outs: list[RequestOutput]) -> list[float]:
            return [(o.probs or [0.0])[0] for o in outs]

    return await run_pooled(request, ctx, "pool", prompts, params, req.priority, arrival, names[1],
                            lambda outs, use: answer(scores(outs), use))


def _checked(req: Any) -> None:
    """The body's own checks, before the model is waited for (Gateway.open_request)."""
    try:
        pooling_params(req.truncate_prompt_tokens).validate()
        if isinstance(req, ScoreRequest):
            one, two, names = req.texts()
            pair_indices(len(one), len(two), names)
        elif isinstance(req, RerankRequest):
            pair_indices(1, len(req.documents), ("query", "documents"))
            if req.top_n is not None and req.top_n < 0:
                raise ValueError(f"top_n: must be at least 0 (0: every document), got {req.top_n}")
    except ValueError as e:
        raise bad_request(e) from None
