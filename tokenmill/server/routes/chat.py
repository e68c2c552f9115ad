"""/v1/chat/completions: a conversation through the tokenizer's chat template, streamed or
not, with logprobs and vLLM's prompt_logprobs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.context import ServerContext
from tokenmill.server.errors import APIError, error_response
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.routes import body
from tokenmill.server.streaming import (
    SSE_DONE,
    ChoiceState,
    StreamFailed,
    collect_finished,
    finish_reason,
    sse,
    sse_response,
    unless_disconnected,
    usage,
)


def register(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/chat/completions", openapi_extra=body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req, arrival = await ctx.open_generation(request, ChatCompletionRequest)
        if req.tools:
            raise APIError(400, "tools: tool calling is not supported yet", param="tools")
        if req.stream and req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs: not available when stream is true", param="prompt_logprobs")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, "response_format: only type 'text' is supported", param="response_format")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= 20:
                raise APIError(400, f"top_logprobs: must be in [0, 20], got {req.top_logprobs}", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        text = ctx.chat_prompt(req.messages, req.add_generation_prompt)
        ids = await ctx.encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(max_tokens, k)
        as_ids = req.return_tokens_as_token_ids
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        group = await ctx.submit([(rid, ctx.prompt_dict(text, ids, req.cache_salt), params)], req.priority, arrival)
        name, engine = ctx.name, ctx.engine

        def chunk(choice: dict[str, Any]) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": int(arrival), "model": name,
                        "choices": [choice]})

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                states: dict[tuple[str, int], ChoiceState] = {}
                cached: dict[str, int] = {}
                try:
                    async for _, c, d in ctx.choice_deltas(group, params, states, cached):
                        if d.first:  # the role comes first, with the first token, as vLLM sends it
                            yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None})
                        lp = {"content": ctx.chat_logprobs(c, *d.tokens, k, as_ids)} if k is not None else None
                        yield chunk({"index": c.index, "delta": {"content": d.text} if d.text else {},
                                     "logprobs": lp, "finish_reason": d.finish_reason,
                                     "stop_reason": c.stop_reason if d.finish_reason else None})
                except StreamFailed as e:
                    for event in ctx.stream_failed(e):
                        yield event
                    return
                if include_usage:
                    n_out = sum(st.tokens for st in states.values())
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(arrival),
                               "model": name, "choices": [], "usage": usage(len(ids), n_out, cached.get(rid, 0))})
                yield SSE_DONE

            return sse_response(events(), lambda: engine.release(group))

        async def collect() -> Response:
            out = (await collect_finished(engine, group))[rid]
            if out.error is not None:
                return error_response(ctx.engine_error(out))
            choices = [{
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": ({"content": ctx.chat_logprobs(c, 0, len(c.token_ids), k, as_ids)}
                             if k is not None else None),
                "finish_reason": finish_reason(c), "stop_reason": c.stop_reason,
            } for c in out.outputs]
            n_out = sum(len(c.token_ids) for c in out.outputs)
            resp = {"id": rid, "object": "chat.completion", "created": int(arrival), "model": name,
                    "choices": choices, "usage": usage(len(ids), n_out, out.num_cached_tokens)}
            if req.prompt_logprobs is not None:  # vLLM puts them beside the choices
                resp["prompt_logprobs"] = ctx.vllm_prompt_logprobs(ids, out.prompt_logprobs or [],
                                                                   req.prompt_logprobs)
            return JSONResponse(resp)

        return await unless_disconnected(request, collect())
