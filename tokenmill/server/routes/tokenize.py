"""/tokenize and /detokenize (vLLM's): a prompt or chat conversation to token ids, and back."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from tokenmill.server.errors import APIError
from tokenmill.server.gateway import Gateway
from tokenmill.server.protocol import DetokenizeRequest, TokenizeRequest
from tokenmill.server.routes import body


def register(app: FastAPI, gw: Gateway) -> None:
    @app.post("/tokenize", openapi_extra=body(TokenizeRequest))
    @gw.route
    async def tokenize(request: Request) -> dict[str, Any]:
        ctx, req, _ = await gw.open_request(request, TokenizeRequest, auth=False)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            ids = await ctx.encode(ctx.chat_prompt(req), add_special_tokens=False)
        else:
            ids = await ctx.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": ctx.llm_engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", openapi_extra=body(DetokenizeRequest))
    @gw.route
    async def detokenize(request: Request) -> dict[str, Any]:
        ctx, req, _ = await gw.open_request(request, DetokenizeRequest, auth=False)
        vocab = ctx.vocab
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: {bad[:5]} outside the vocabulary [0, {vocab})", param="tokens")
        if ctx.tokenizer is None:
            raise APIError(400, "tokens: this model has no tokenizer", param="tokens")
        return {"prompt": ctx.tokenizer.decode(req.tokens)}
