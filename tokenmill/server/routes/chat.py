"""/v1/chat/completions: a conversation through the tokenizer's chat template, streamed or
not, with logprobs, vLLM's prompt_logprobs, structured outputs and tool calls (server/tools.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.ops.energy import sum_compute
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.answer import AnswerStream, answer_parts
from tokenmill.server.context import ServerContext
from tokenmill.server.errors import APIError, bad_request, error_response
from tokenmill.server.file_search import FileSearch
from tokenmill.server.gateway import Gateway, _extras
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
from tokenmill.server.tools import ToolSetup
from tokenmill.server.ttc import ttc_params, ttc_response


def _checked(req: ChatCompletionRequest) -> None:
    """The body's own checks: made before the model is waited for (Gateway.open_request)."""
    req._search = FileSearch(req.tools, req.tool_choice, True, lambda param, message: APIError(
        400, f"{param}: {message}", param=param))
    if req.stream and req.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs: not available when stream is true", param="prompt_logprobs")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs: must be in [0, 20], got {req.top_logprobs}", param="top_logprobs")
    ttc_params(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    try:  # (again once the model is there, with its vocabulary)
        req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None).validate()
    except ValueError as e:
        raise bad_request(e) from None


@dataclass
class ChatPlan:
    """A chat request made ready for the engine."""

    text: str  # the rendered prompt
    ids: list[int]  # its tokens (truncated as the request asks)
    params: SamplingParams  # with its output constraint compiled
    tools: ToolSetup | None
    k: int | None  # top logprobs per token (None: no logprobs)
    rparser: str | None  # the reasoning parser that splits the answer


async def plan_chat(ctx: ServerContext, req: ChatCompletionRequest) -> ChatPlan:
    """The prompt, sampling params and answer setup of a chat request (also the Responses API's,
    which it turns into one); a 400 for what the model cannot do with it."""
    k = (req.top_logprobs or 0) if req.logprobs else None
    try:
        tools = ToolSetup.from_request(req.tools, req.tool_choice, req.parallel_tool_calls, ctx.tool_parser)
    except ValueError as e:
        raise bad_request(e) from None
    other = ctx.constraint(req)
    text = ctx.chat_prompt(req, tools.tools if tools else None)
    ids = await ctx.encode(text, add_special_tokens=False)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = ctx.sampling_params(req, max_tokens, k)
    ids, text = ctx.llm_engine.truncate_prompt(ids, params, text)
    if tools is not None and tools.constraint is not None:
        if other is not None:
            raise APIError(400, f"tool_choice: {tools.mode!r} constrains the output itself; it cannot be "
                           f"combined with response_format or guided decoding", param="tool_choice")
        await ctx.constrain(params, (tools.constraint, "tools"))
    else:
        await ctx.constrain(params, other)
    if tools is not None and tools.mode == "auto":
        # Call markers may be special tokens (Mistral's, Llama's, <tool_call> in some Hermes
        # tokenizers): skipped, the parser would never see them (vLLM keeps them for all three).
        params.skip_special_tokens = False
    ctx.check_resume(req, params)
    # Constrained output (tools required or named, response_format) is all answer: vLLM applies
    # a grammar after the reasoning, here there is none to split off.
    rparser = ctx.settings.reasoning_parser if params.structured_outputs is None else None
    return ChatPlan(text, ids, params, tools, k, rparser)


async def plan_searched(ctx: ServerContext, req: ChatCompletionRequest, search: FileSearch,
                        max_tokens: int | None) -> tuple[ChatCompletionRequest, ChatPlan]:
    """A chat request (a Responses request's too) planned with its file_search's excerpts: as many
    of the best are kept as leave the answer its room (max_tokens, else a quarter of the context up
    to 512 tokens), dropping the worst first."""
    limit = ctx.llm_engine.max_model_len
    room = max_tokens or min(512, limit // 4)
    planned: dict[int, tuple[ChatCompletionRequest, ChatPlan]] = {}

    async def fits(n: int) -> bool:
        creq = _with_excerpts(ctx, req, search, n)
        planned[n] = (creq, await plan_chat(ctx, creq))
        return n == 0 or len(planned[n][1].ids) + room <= limit

    k = len(search.results)
    if await fits(k):  # (all of them, which most often fit)
        return planned[k]
    lo, hi = 0, k - 1  # the prompt grows with n: the most that fit, in log2(k) more plans
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if await fits(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo not in planned:  # (0: none fit, never planned)
        await fits(lo)
    return planned[lo]


def _with_excerpts(ctx: ServerContext, req: ChatCompletionRequest, search: FileSearch, n: int) -> ChatCompletionRequest:
    """The chat request with the best n excerpts of its file_search (the template's documents, or
    before its latest user message), and without the tool."""
    tools, choice = FileSearch.other_tools(req.tools, req.tool_choice)
    messages = list(req.messages)
    documents = search.documents(ctx.tokenizer, n, req.chat_template)
    if n and documents is None:
        last = max(i for i, m in enumerate(messages) if m.role == "user")
        messages[last] = messages[last].model_copy(update={"content": search.with_excerpts(messages[last].text(), n)})
    return req.model_copy(update={"messages": messages, "tools": tools, "tool_choice": choice,
                                  "documents": (req.documents or []) + documents if documents is not None
                                  else req.documents})


def _query(req: ChatCompletionRequest) -> str | None:
    return next((m.text() for m in reversed(req.messages) if m.role == "user"), None)


def register(app: FastAPI, gw: Gateway) -> None:
    @app.post("/v1/chat/completions", openapi_extra=body(ChatCompletionRequest))
    @gw.route
    async def chat_completions(request: Request) -> Response:
        ctx, req, arrival = await gw.open_request(request, ChatCompletionRequest, generation=True, precheck=_checked,
                                                  prepare=lambda r: r._search.run(gw, _query(r), request,
                                                                                  r.cache_salt))
        search: FileSearch = req._search
        if search.present:
            req, plan = await plan_searched(ctx, req, search, req.max_completion_tokens
                                            if req.max_completion_tokens is not None else req.max_tokens)
            if search.call is not None:
                _extras()["file_search_call"] = search.call
        else:
            plan = await plan_chat(ctx, req)
        params, ids, text, tools, k, rparser = plan.params, plan.ids, plan.text, plan.tools, plan.k, plan.rparser
        tp = ttc_params(req)
        as_ids = req.return_tokens_as_token_ids
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if tp is not None:
            return await ttc_response(ctx, request, req, True, rid, ctx.prompt_dict(text, ids, req.cache_salt),
                                      params, tp, arrival)
        group = await ctx.submit([(rid, ctx.prompt_dict(text, ids, req.cache_salt, req.resume_token_ids), params)],
                                 req.priority, arrival)
        name, engine = ctx.name, ctx.engine

        ids_out = req.return_token_ids
        first_chunk = [True]

        def chunk(choice: dict[str, Any], running: dict[str, int] | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": int(arrival), "model": name,
                    "choices": [choice]}
            if running is not None:
                body["usage"] = running
            if ids_out and first_chunk[0]:  # vLLM sends the prompt's ids with the first chunk
                body["prompt_token_ids"] = ids
                first_chunk[0] = False
            return sse(body)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # (with include_usage only, as vLLM reads the pair)
            continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)

            async def events() -> AsyncIterator[str]:
                states: dict[tuple[str, int], ChoiceState] = {}
                answers: dict[int, AnswerStream] = {}
                cached: dict[str, int] = {}
                computes: dict[str, Any] = {}
                if req.resume_token_ids:  # the first server streamed this much: start where it stopped
                    states[(rid, 0)], sent = ctx.resumed_state(ids, req.resume_token_ids, params)
                    answers[0] = AnswerStream(tools, rparser)
                    answers[0].resume(sent)
                try:
                    async for _, c, d in ctx.choice_deltas(group, params, states, cached, computes):
                        # A step's chunks leave in one write: a replica that dies between two of them
                        # would have a router resume after tokens whose text it never relayed.
                        parts = []
                        running = None
                        if continuous:  # (vLLM's: the choice's tokens so far on every chunk)
                            n = states[(rid, c.index)].tokens
                            running = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
                        if d.first:  # the role comes first, with the first token, as vLLM sends it
                            before = None if running is None else {**running, "completion_tokens": 0,
                                                                   "total_tokens": len(ids)}
                            parts.append(chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}, before))
                        lp = {"content": ctx.chat_logprobs(c, *d.tokens, k, as_ids)} if k is not None else None
                        answer = answers.setdefault(c.index, AnswerStream(tools, rparser))
                        thought, content, tool_deltas, reason = answer.feed(
                            c.text[: d.text_start + len(d.text)], d.text, d.finish_reason)
                        # One chunk per tool-call delta, as OpenAI streams them; an empty one keeps the step's timing.
                        # (reasoning_content too: vLLM's older name, the DeepSeek API's, what many clients read)
                        deltas = [{"reasoning": thought, "reasoning_content": thought}] if thought else []
                        deltas += [{"content": content}] if content else []
                        deltas = (deltas + [{"tool_calls": [t]} for t in tool_deltas]) or [{}]
                        for j, delta in enumerate(deltas):
                            last = j == len(deltas) - 1
                            choice = {"index": c.index, "delta": delta, "logprobs": lp if j == 0 else None,
                                      "finish_reason": reason if last else None,
                                      "stop_reason": c.stop_reason if reason and last else None}
                            if ids_out:
                                choice["token_ids"] = c.token_ids[d.tokens[0]:d.tokens[1]] if j == 0 else []
                            parts.append(chunk(choice, running))
                        yield "".join(parts)
                except StreamFailed as e:
                    for event in ctx.stream_failed(e):
                        yield event
                    return
                if include_usage:
                    n_out = sum(st.tokens for st in states.values())
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(arrival),
                               "model": name, "choices": [],
                               "usage": usage(len(ids), n_out, cached.get(rid, 0), sum_compute(computes.values()))})
                yield SSE_DONE

            return sse_response(events(), lambda: engine.release(group))

        async def collect() -> Response:
            out = (await collect_finished(engine, group))[rid]
            if out.error is not None:
                return error_response(ctx.engine_error(out))
            choices = []
            for c in out.outputs:
                thought, content, tool_calls, reason = answer_parts(tools, rparser, c.text, finish_reason(c))
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if tool_calls:
                    message["tool_calls"] = tool_calls
                if rparser is not None:
                    message["reasoning"] = message["reasoning_content"] = thought
                choices.append({
                    "index": c.index, "message": message,
                    "logprobs": ({"content": ctx.chat_logprobs(c, 0, len(c.token_ids), k, as_ids)}
                                 if k is not None else None),
                    "finish_reason": reason, "stop_reason": c.stop_reason,
                    **({"token_ids": c.token_ids} if ids_out else {}),
                })
            n_out = sum(len(c.token_ids) for c in out.outputs)
            resp = {"id": rid, "object": "chat.completion", "created": int(arrival), "model": name,
                    "choices": choices, "usage": usage(len(ids), n_out, out.num_cached_tokens, out.compute)}
            if ids_out:
                resp["prompt_token_ids"] = ids
            if req.prompt_logprobs is not None:  # vLLM puts them beside the choices
                resp["prompt_logprobs"] = ctx.vllm_prompt_logprobs(ids, out.prompt_logprobs or [],
                                                                   req.prompt_logprobs)
            return JSONResponse(resp)

        return await unless_disconnected(request, collect())
